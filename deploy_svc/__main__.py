"""`python -m deploy_svc`: the deployment service (DeployService and AuthService), port 50051."""

import sys

from deploy_svc.servicer import register
from shared.framework.server import ServiceSpec, main

SPEC = ServiceSpec(
    name="deploy_svc",
    address=lambda settings: settings.deploy_addr,
    register=register,
    metrics_port=lambda settings: settings.deploy_metrics_port,
    open_ended=frozenset({"/relman.v1.DeployService/WatchDeployment"}),
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
