"""`python -m audit_svc`: the audit service (AuditService), port 50052."""

import sys

from audit_svc.servicer import register
from shared.framework.server import ServiceSpec, main

SPEC = ServiceSpec(
    name="audit_svc",
    address=lambda settings: settings.audit_addr,
    register=register,
    metrics_port=lambda settings: settings.audit_metrics_port,
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
