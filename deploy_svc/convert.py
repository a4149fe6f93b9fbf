"""Domain results as DeployService and AuthService messages (transport layer).

Each function copies what the domain loaded into a message; none of them reads the
database (what a view needs is loaded by its use case). Every resource carries its
resource name (shared.persistence.resource_names); Service, Environment and Runbook
their etag, the row's version, which the database raises on every change.
"""

from __future__ import annotations

from deploy_svc.deployments import FullDeployment, LiveDeployment, StageRecord
from deploy_svc.dora import Bucket
from deploy_svc.gates import Gate
from deploy_svc.policies import Policy
from relman.v1 import auth_pb2, common_pb2, deploy_pb2, webhook_pb2
from shared.framework.protos import enum_to_proto, id_text, timestamp
from shared.persistence import models
from shared.persistence import resource_names as names


def runbook(row: models.Runbook) -> common_pb2.Runbook:
    return common_pb2.Runbook(
        id=str(row.id),
        resource_name=names.runbook_name(row.id),
        etag=str(row.version),
        title=row.title,
        content=row.content,
        service_id=id_text(row.service_id),
        environment_id=id_text(row.environment_id),
        tags=row.tags,
        created_by=str(row.created_by),
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def user(row: models.User) -> common_pb2.User:
    """A user, without its password hash."""
    return common_pb2.User(
        id=str(row.id),
        resource_name=names.user_name(row.username),
        email=row.email,
        username=row.username,
        full_name=row.full_name or "",
        role=enum_to_proto(common_pb2.Role, row.role),
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def api_token(row: models.ApiToken) -> auth_pb2.ApiToken:
    """A token's record, without the token or its hash."""
    return auth_pb2.ApiToken(
        id=str(row.id),
        user_id=str(row.user_id),
        name=row.name,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        last_used_at=timestamp(row.last_used_at),
        revoked_at=timestamp(row.revoked_at),
        created_by=str(row.created_by) if row.created_by else "",
    )


def team(row: models.Team) -> common_pb2.Team:
    return common_pb2.Team(
        id=str(row.id),
        resource_name=names.team_name(row.name),
        name=row.name,
        description=row.description or "",
        slack_channel=row.slack_channel or "",
        member_count=row.member_count,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def environment(row: models.Environment) -> common_pb2.Environment:
    return common_pb2.Environment(
        id=str(row.id),
        resource_name=names.environment_name(row.name),
        etag=str(row.version),
        name=row.name,
        description=row.description or "",
        environment_type=enum_to_proto(common_pb2.EnvironmentType, row.environment_type),
        config_path=row.config_path or "",
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def service(row: models.Service) -> common_pb2.Service:
    return common_pb2.Service(
        id=str(row.id),
        resource_name=names.service_name(row.name),
        etag=str(row.version),
        name=row.name,
        description=row.description or "",
        repository_url=row.repository_url or "",
        team_id=str(row.team_id),
        slack_channel=row.slack_channel or "",
        owner_id=id_text(row.owner_id),
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def release(row: models.Release) -> common_pb2.Release:
    """A release; its resource name needs its service's name (Release.service_name, read
    with the release)."""
    return common_pb2.Release(
        id=str(row.id),
        resource_name=names.release_name(row.service_name, row.version),
        service_id=str(row.service_id),
        version=row.version,
        status=enum_to_proto(common_pb2.ReleaseStatus, row.status),
        release_notes=row.release_notes or "",
        git_commit=row.git_commit or "",
        hotfix=row.hotfix,
        created_by=str(row.created_by),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def stage(row: models.PipelineStage | StageRecord) -> common_pb2.PipelineStage:
    return common_pb2.PipelineStage(
        id=str(row.id),
        deployment_id=str(row.deployment_id),
        name=row.name,
        order=row.order,
        status=enum_to_proto(common_pb2.StageStatus, row.status),
        timeout_seconds=row.timeout_seconds,
        started_at=timestamp(row.started_at),
        completed_at=timestamp(row.completed_at),
        output=row.output or "",
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def approval(row: models.Approval) -> common_pb2.Approval:
    return common_pb2.Approval(
        id=str(row.id),
        deployment_id=str(row.deployment_id),
        approver_id=str(row.approver_id),
        status=enum_to_proto(common_pb2.ApprovalStatus, row.status),
        notes=row.notes or "",
        approved_at=timestamp(row.approved_at),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def metric(row: models.DeploymentMetric) -> common_pb2.DeploymentMetric:
    return common_pb2.DeploymentMetric(
        id=str(row.id),
        deployment_id=str(row.deployment_id),
        metric_name=row.metric_name,
        metric_value=row.metric_value,
        unit=row.unit or "",
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def deployment(
    row: models.Deployment | FullDeployment, view: int = common_pb2.DEPLOYMENT_VIEW_BASIC
) -> common_pb2.Deployment:
    """A deployment with the children its view asks for (loaded by the domain)."""
    message = common_pb2.Deployment(
        id=str(row.id),
        resource_name=names.deployment_name(row.id),
        release_id=str(row.release_id),
        environment_id=str(row.environment_id),
        status=enum_to_proto(common_pb2.DeploymentStatus, row.status),
        deployed_by=str(row.deployed_by),
        deployed_at=timestamp(row.deployed_at),
        completed_at=timestamp(row.completed_at),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )
    if view in (common_pb2.DEPLOYMENT_VIEW_WITH_STAGES, common_pb2.DEPLOYMENT_VIEW_FULL):
        message.stages.extend(stage(s) for s in row.stages)
    if view == common_pb2.DEPLOYMENT_VIEW_FULL:
        message.approvals.extend(approval(a) for a in row.approvals)
        message.metrics.extend(metric(m) for m in row.metrics)
    return message


def rollback(row: models.Rollback) -> common_pb2.Rollback:
    return common_pb2.Rollback(
        id=str(row.id),
        resource_name=names.rollback_name(row.id),
        deployment_id=str(row.deployment_id),
        target_release_id=str(row.target_release_id),
        reason=row.reason,
        status=enum_to_proto(common_pb2.RollbackStatus, row.status),
        initiated_by=str(row.initiated_by),
        completed_at=timestamp(row.completed_at),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        redeployment_id=id_text(row.redeployment_id),
    )


def live_deployment(item: LiveDeployment) -> deploy_pb2.LiveDeployment:
    return deploy_pb2.LiveDeployment(
        service_id=str(item.service_id),
        environment_id=str(item.environment_id),
        live_release=release(item.live_release) if item.live_release else None,
        live_deployment=deployment(item.live_deployment) if item.live_deployment else None,
        active_deployment=deployment(item.active_deployment) if item.active_deployment else None,
    )


def policy(item: Policy) -> common_pb2.EnvironmentPolicy:
    """A policy in force, with the policy it will become when a change is pending."""
    rules = item.rules
    message = common_pb2.EnvironmentPolicy(
        environment_id=str(item.environment_id),
        required_approvals=rules.required_approvals,
        approver_roles=[enum_to_proto(common_pb2.Role, r) for r in rules.approver_roles],
        deployer_roles=[enum_to_proto(common_pb2.Role, r) for r in rules.deployer_roles],
        required_stages=rules.required_stages,
        bake_minutes=rules.bake_minutes,
        etag=item.etag,
        update_time=timestamp(item.update_time),
    )
    if (pending := item.pending_policy) is not None:
        message.pending_change.CopyFrom(policy(pending))
        message.pending_effective_at.CopyFrom(timestamp(item.pending_effective_at))
    return message


def freeze_window(row: models.FreezeWindow) -> common_pb2.FreezeWindow:
    return common_pb2.FreezeWindow(
        id=str(row.id),
        environment_id=id_text(row.environment_id),
        service_id=id_text(row.service_id),
        reason=row.reason,
        start_time=timestamp(row.start_time),
        end_time=timestamp(row.end_time),
        cron=row.cron or "",
        time_zone=row.time_zone or "",
        duration_minutes=row.duration_minutes or 0,
        created_by=str(row.created_by),
        created_at=timestamp(row.created_at),
    )


def promotion_check(gates: list[Gate]) -> common_pb2.PromotionCheck:
    return common_pb2.PromotionCheck(
        allowed=all(gate.passed for gate in gates),
        gates=[
            common_pb2.PolicyGate(name=gate.name, passed=gate.passed, detail=gate.detail)
            for gate in gates
        ],
    )


def dora_bucket(bucket: Bucket) -> deploy_pb2.DoraBucket:
    return deploy_pb2.DoraBucket(
        start_time=timestamp(bucket.start_time),
        end_time=timestamp(bucket.end_time),
        deployments=bucket.deployments,
        deployment_frequency_per_day=bucket.frequency_per_day,
        lead_time_for_changes_seconds=bucket.lead_time_s,
        failed_deployments=bucket.failed,
        change_failure_rate=bucket.change_failure_rate,
        failed_deployment_recovery_time_seconds=bucket.recovery_time_s,
        rework_deployments=bucket.rework,
        deployment_rework_rate=bucket.rework_rate,
    )


def webhook(row: models.Webhook) -> webhook_pb2.Webhook:
    """A webhook, without its secret (shown once, by CreateWebhook); its owner is who
    made it."""
    return webhook_pb2.Webhook(
        id=str(row.id),
        resource_name=names.webhook_name(row.id),
        url=row.url,
        event_types=row.event_types,
        service_id=id_text(row.service_id),
        team_id=id_text(row.team_id),
        format=enum_to_proto(webhook_pb2.WebhookFormat, row.format),
        active=row.active,
        owner_id=str(row.created_by),
        consecutive_failures=row.consecutive_failures,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        etag=str(row.version),
    )


def webhook_delivery(row: models.WebhookDelivery) -> webhook_pb2.WebhookDelivery:
    """A delivery, without the body it sends."""
    return webhook_pb2.WebhookDelivery(
        id=str(row.id),
        webhook_id=str(row.webhook_id),
        event_type=row.event_type,
        status=enum_to_proto(webhook_pb2.WebhookDeliveryStatus, row.status),
        attempts=row.attempts,
        last_status_code=row.last_status_code or 0,
        last_error=row.last_error or "",
        next_attempt_at=timestamp(row.next_attempt_at),
        delivered_at=timestamp(row.delivered_at),
        created_at=timestamp(row.created_at),
    )
