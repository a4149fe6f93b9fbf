"""DeployService over gRPC (transport layer): proto in, proto out, no SQL.

Each RPC parses and checks its request's fields, calls one use case of the domain
(deploy_svc.releases, deployments, rollbacks, catalog), which opens its own unit of
work, and converts the result (deploy_svc.convert). The caller is `current_actor`, set
by the authentication interceptor from the bearer token and the connection, never
from a request field.
"""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from deploy_svc import (
    catalog,
    convert,
    deployments,
    dispatcher,
    dora,
    freezes,
    gates,
    policies,
    releases,
    rollbacks,
    sweeper,
)
from deploy_svc.auth_servicer import AUTH_SERVICE, AuthServicer
from deploy_svc.watch import DeploymentWatcher
from deploy_svc.webhook_servicer import WEBHOOK_SERVICE, WebhookServicer
from relman.v1 import auth_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc, webhook_pb2_grpc
from shared.framework.errors import InvalidArgument
from shared.framework.server import Resources
from shared.framework.validation import (
    enum_word,
    masked_changes,
    optional_uuid,
    parse_timestamp,
    parse_uuid,
    request_key,
)
from shared.identity.actor import current_actor
from shared.persistence.models import Environment, Runbook, Service, StageStatus, Team

DEPLOY_SERVICE = deploy_pb2.DESCRIPTOR.services_by_name["DeployService"]

# The use case that reads a deployment in each view.
_READ_IN_VIEW = {
    common_pb2.DEPLOYMENT_VIEW_UNSPECIFIED: deployments.get_deployment,
    common_pb2.DEPLOYMENT_VIEW_BASIC: deployments.get_deployment,
    common_pb2.DEPLOYMENT_VIEW_WITH_STAGES: deployments.get_deployment_with_stages,
    common_pb2.DEPLOYMENT_VIEW_FULL: deployments.get_full_deployment,
}


def _page(response_type, field: str, page, convert_item):
    return response_type(
        **{field: [convert_item(item) for item in page.items]},
        next_page_token=page.next_page_token,
        total_size=page.total_size,
    )


class DeployServicer(deploy_pb2_grpc.DeployServiceServicer):
    def __init__(self, resources: Resources) -> None:
        self.database = resources.database
        self.weaken_delay_s = resources.settings.policy_weaken_delay_s
        self.watcher = DeploymentWatcher(resources.database)
        resources.on_stop.append(self.watcher.close)

    # releases

    async def CreateRelease(self, request, context):
        service_id = parse_uuid("service_id", request.service_id)
        actor = current_actor.get()
        release = await releases.create_release(
            self.database,
            actor,
            service_id=service_id,
            version=request.version,
            release_notes=request.release_notes,
            git_commit=request.git_commit,
            key=request_key(actor, "CreateRelease", request),
            hotfix=request.hotfix,
        )
        return convert.release(release)

    async def GetRelease(self, request, context):
        release_id = parse_uuid("release_id", request.release_id)
        return convert.release(await releases.get_release(self.database, release_id))

    async def ListReleases(self, request, context):
        service_id = optional_uuid("service_id", request.service_id)
        status = enum_word("status", common_pb2.ReleaseStatus, request.status, required=False)
        page = await releases.list_releases(
            self.database,
            service_id=service_id,
            status=status,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return _page(deploy_pb2.ListReleasesResponse, "releases", page, convert.release)

    # deployments

    async def CreateDeployment(self, request, context):
        release_id = parse_uuid("release_id", request.release_id)
        environment_id = parse_uuid("environment_id", request.environment_id)
        actor = current_actor.get()
        deployment = await deployments.create_deployment(
            self.database,
            actor,
            release_id,
            environment_id,
            list(request.stage_names),
            request_key(actor, "CreateDeployment", request),
            request.freeze_override_reason,
        )
        return convert.deployment(deployment, common_pb2.DEPLOYMENT_VIEW_WITH_STAGES)

    async def PromoteRelease(self, request, context):
        release_id = parse_uuid("release_id", request.release_id)
        environment_id = parse_uuid("target_environment_id", request.target_environment_id)
        reviewer_ids = [
            parse_uuid(f"reviewer_ids[{i}]", value) for i, value in enumerate(request.reviewer_ids)
        ]
        actor = current_actor.get()
        deployment = await deployments.promote_release(
            self.database,
            actor,
            release_id,
            environment_id,
            reviewer_ids,
            request_key(actor, "PromoteRelease", request),
            request.freeze_override_reason,
        )
        return convert.deployment(deployment, common_pb2.DEPLOYMENT_VIEW_WITH_STAGES)

    async def GetDeployment(self, request, context):
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        view = request.view
        if view not in _READ_IN_VIEW:
            raise InvalidArgument.field("view", "is not a DeploymentView")
        row = await _READ_IN_VIEW[view](self.database, deployment_id)
        return convert.deployment(row, view or common_pb2.DEPLOYMENT_VIEW_BASIC)

    async def ListDeployments(self, request, context):
        filters = {
            "service_id": optional_uuid("service_id", request.service_id),
            "release_id": optional_uuid("release_id", request.release_id),
            "environment_id": optional_uuid("environment_id", request.environment_id),
            "status": enum_word(
                "status", common_pb2.DeploymentStatus, request.status, required=False
            ),
        }
        page = await deployments.list_deployments(
            self.database, **filters, page_size=request.page_size, page_token=request.page_token
        )
        return _page(deploy_pb2.ListDeploymentsResponse, "deployments", page, convert.deployment)

    async def ListLiveDeployments(self, request, context):
        service_id = optional_uuid("service_id", request.service_id)
        page = await deployments.list_live_deployments(
            self.database, service_id, request.page_size, request.page_token
        )
        return _page(
            deploy_pb2.ListLiveDeploymentsResponse,
            "live_deployments",
            page,
            convert.live_deployment,
        )

    async def UpdatePipelineStage(self, request, context):
        stage_id = parse_uuid("stage_id", request.stage_id)
        status = StageStatus(
            enum_word("status", common_pb2.StageStatus, request.status, required=True)
        )
        actor = current_actor.get()
        key = request_key(actor, "UpdatePipelineStage", request)
        stage = await deployments.update_pipeline_stage(
            self.database, actor, stage_id, status, request.output, key
        )
        return convert.stage(stage)

    async def CancelDeployment(self, request, context):
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        actor = current_actor.get()
        key = request_key(actor, "CancelDeployment", request)
        deployment = await deployments.cancel_deployment(
            self.database, actor, deployment_id, request.reason, key
        )
        return convert.deployment(deployment, common_pb2.DEPLOYMENT_VIEW_WITH_STAGES)

    async def _vote(self, request, method: str, approve: bool):
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        actor = current_actor.get()
        approval = await deployments.vote(
            self.database,
            actor,
            deployment_id,
            approve,
            request.notes,
            request_key(actor, method, request),
        )
        return convert.approval(approval)

    async def ApproveDeployment(self, request, context):
        return await self._vote(request, "ApproveDeployment", approve=True)

    async def RejectDeployment(self, request, context):
        return await self._vote(request, "RejectDeployment", approve=False)

    async def RollbackDeployment(self, request, context):
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        actor = current_actor.get()
        key = request_key(actor, "RollbackDeployment", request)
        rollback = await rollbacks.rollback_deployment(
            self.database, actor, deployment_id, request.reason, key
        )
        return convert.rollback(rollback)

    async def GetRollback(self, request, context):
        rollback_id = parse_uuid("rollback_id", request.rollback_id)
        return convert.rollback(await rollbacks.get_rollback(self.database, rollback_id))

    async def ListRollbacks(self, request, context):
        filters = {
            "service_id": optional_uuid("service_id", request.service_id),
            "environment_id": optional_uuid("environment_id", request.environment_id),
            "deployment_id": optional_uuid("deployment_id", request.deployment_id),
            "status": enum_word(
                "status", common_pb2.RollbackStatus, request.status, required=False
            ),
        }
        page = await rollbacks.list_rollbacks(
            self.database, **filters, page_size=request.page_size, page_token=request.page_token
        )
        return _page(deploy_pb2.ListRollbacksResponse, "rollbacks", page, convert.rollback)

    async def RecordDeploymentMetric(self, request, context):
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        metric = await deployments.record_deployment_metric(
            self.database,
            current_actor.get(),
            deployment_id,
            request.metric_name,
            request.metric_value,
            request.unit,
        )
        return convert.metric(metric)

    async def WatchDeployment(self, request, context):
        """The deployment now, then after every change, until a terminal status."""
        deployment_id = parse_uuid("deployment_id", request.deployment_id)
        async with self.watcher.subscribe(deployment_id) as mailbox:
            snapshot = await self.watcher.read(deployment_id)  # after subscribing: none missed
            last = None
            while True:
                message = convert.deployment(snapshot, common_pb2.DEPLOYMENT_VIEW_FULL)
                if message != last:
                    yield message
                    last = message
                if snapshot.status in deployments.TERMINAL:
                    return
                snapshot = await mailbox.get()

    # catalogue

    async def GetEnvironment(self, request, context):
        environment_id = parse_uuid("environment_id", request.environment_id)
        return convert.environment(await catalog.get(self.database, Environment, environment_id))

    async def GetService(self, request, context):
        service_id = parse_uuid("service_id", request.service_id)
        return convert.service(await catalog.get(self.database, Service, service_id))

    async def GetTeam(self, request, context):
        team_id = parse_uuid("team_id", request.team_id)
        return convert.team(await catalog.get(self.database, Team, team_id))

    async def ListEnvironments(self, request, context):
        page = await catalog.list_environments(
            self.database, page_size=request.page_size, page_token=request.page_token
        )
        return _page(deploy_pb2.ListEnvironmentsResponse, "environments", page, convert.environment)

    async def ListServices(self, request, context):
        team_id = optional_uuid("team_id", request.team_id)
        page = await catalog.list_services(
            self.database,
            team_id=team_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return _page(deploy_pb2.ListServicesResponse, "services", page, convert.service)

    async def ListTeams(self, request, context):
        page = await catalog.list_teams(
            self.database, page_size=request.page_size, page_token=request.page_token
        )
        return _page(deploy_pb2.ListTeamsResponse, "teams", page, convert.team)

    async def ListRunbooks(self, request, context):
        service_id = optional_uuid("service_id", request.service_id)
        environment_id = optional_uuid("environment_id", request.environment_id)
        page = await catalog.list_runbooks(
            self.database,
            service_id=service_id,
            environment_id=environment_id,
            tag=request.tag,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return _page(deploy_pb2.ListRunbooksResponse, "runbooks", page, convert.runbook)

    async def GetRunbook(self, request, context: grpc.aio.ServicerContext):
        runbook_id = parse_uuid("runbook_id", request.runbook_id)
        return convert.runbook(await catalog.get(self.database, Runbook, runbook_id))

    # catalogue administration

    async def CreateTeam(self, request, context):
        actor = current_actor.get()
        team = await catalog.create_team(
            self.database,
            actor,
            name=request.name,
            description=request.description,
            slack_channel=request.slack_channel,
            key=request_key(actor, "CreateTeam", request),
        )
        return convert.team(team)

    async def CreateEnvironment(self, request, context):
        actor = current_actor.get()
        key = request_key(actor, "CreateEnvironment", request)
        environment_type = enum_word(
            "environment_type", common_pb2.EnvironmentType, request.environment_type, required=True
        )
        environment = await catalog.create_environment(
            self.database,
            actor,
            name=request.name,
            description=request.description,
            environment_type=environment_type,
            config_path=request.config_path,
            key=key,
        )
        return convert.environment(environment)

    async def CreateService(self, request, context):
        actor = current_actor.get()
        fields = {
            "team_id": parse_uuid("team_id", request.team_id),
            "owner_id": optional_uuid("owner_id", request.owner_id),
            "key": request_key(actor, "CreateService", request),
        }
        service = await catalog.create_service(
            self.database,
            actor,
            name=request.name,
            description=request.description,
            repository_url=request.repository_url,
            slack_channel=request.slack_channel,
            **fields,
        )
        return convert.service(service)

    async def UpdateService(self, request, context):
        service = request.service
        service_id = parse_uuid("service.id", service.id)
        changes = masked_changes(
            request.update_mask,
            {
                "description": lambda: catalog.check_field(
                    "description", service.description, "service"
                ),
                "repository_url": lambda: catalog.check_field(
                    "repository_url", service.repository_url, "service"
                ),
                "team_id": lambda: parse_uuid("service.team_id", service.team_id),
                "slack_channel": lambda: catalog.check_field(
                    "slack_channel", service.slack_channel, "service"
                ),
                "owner_id": lambda: optional_uuid("service.owner_id", service.owner_id),
                "is_active": lambda: service.is_active,
            },
            fixed=catalog.NAME_FIXED,
        )
        row = await catalog.update_service(
            self.database, current_actor.get(), service_id, changes, service.etag
        )
        return convert.service(row)

    async def UpdateEnvironment(self, request, context):
        environment = request.environment
        environment_id = parse_uuid("environment.id", environment.id)
        changes = masked_changes(
            request.update_mask,
            {
                "description": lambda: catalog.check_field(
                    "description", environment.description, "environment"
                ),
                "config_path": lambda: catalog.check_field(
                    "config_path", environment.config_path, "environment"
                ),
                "is_active": lambda: environment.is_active,
            },
            fixed=catalog.ENVIRONMENT_FIXED,
        )
        row = await catalog.update_environment(
            self.database, current_actor.get(), environment_id, changes, environment.etag
        )
        return convert.environment(row)

    async def CreateRunbook(self, request, context):
        actor = current_actor.get()
        fields = {
            "service_id": optional_uuid("service_id", request.service_id),
            "environment_id": optional_uuid("environment_id", request.environment_id),
            "key": request_key(actor, "CreateRunbook", request),
        }
        runbook = await catalog.create_runbook(
            self.database,
            actor,
            title=request.title,
            content=request.content,
            tags=list(request.tags),
            **fields,
        )
        return convert.runbook(runbook)

    async def UpdateRunbook(self, request, context):
        runbook = request.runbook
        runbook_id = parse_uuid("runbook.id", runbook.id)
        changes = masked_changes(
            request.update_mask,
            {
                "title": lambda: catalog.check_field("title", runbook.title, "runbook"),
                "content": lambda: catalog.check_field("content", runbook.content, "runbook"),
                "service_id": lambda: optional_uuid("runbook.service_id", runbook.service_id),
                "environment_id": lambda: optional_uuid(
                    "runbook.environment_id", runbook.environment_id
                ),
                "tags": lambda: catalog.check_tags(runbook.tags),
                "is_active": lambda: runbook.is_active,
            },
        )
        row = await catalog.update_runbook(
            self.database, current_actor.get(), runbook_id, changes, runbook.etag
        )
        return convert.runbook(row)

    # environment policies and freeze windows

    async def GetEnvironmentPolicy(self, request, context):
        environment_id = parse_uuid("environment_id", request.environment_id)
        return convert.policy(await policies.get_policy(self.database, environment_id))

    async def UpdateEnvironmentPolicy(self, request, context):
        policy = request.policy
        environment_id = parse_uuid("policy.environment_id", policy.environment_id)

        def roles(field: str, choices):
            words = [
                enum_word(f"policy.{field}[{i}]", common_pb2.Role, number, required=True)
                for i, number in enumerate(getattr(policy, field))
            ]
            return policies.check_roles(field, words, choices)

        changes = masked_changes(
            request.update_mask,
            {
                "required_approvals": lambda: policies.check_required_approvals(
                    policy.required_approvals
                ),
                "approver_roles": lambda: roles("approver_roles", policies.APPROVER_CHOICES),
                "deployer_roles": lambda: roles("deployer_roles", policies.DEPLOYER_CHOICES),
                "required_stages": lambda: policies.check_required_stages(policy.required_stages),
                "bake_minutes": lambda: policies.check_bake_minutes(policy.bake_minutes),
            },
        )
        updated = await policies.update_policy(
            self.database,
            current_actor.get(),
            environment_id,
            changes,
            policy.etag,
            self.weaken_delay_s,
        )
        return convert.policy(updated)

    async def CreateFreezeWindow(self, request, context):
        window = request.freeze_window

        def moment(field: str):
            if not window.HasField(field):
                return None
            return parse_timestamp(f"freeze_window.{field}", getattr(window, field))

        actor = current_actor.get()
        created = await freezes.create_window(
            self.database,
            actor,
            freezes.WindowRequest(
                environment_id=optional_uuid("freeze_window.environment_id", window.environment_id),
                service_id=optional_uuid("freeze_window.service_id", window.service_id),
                reason=window.reason,
                start_time=moment("start_time"),
                end_time=moment("end_time"),
                cron=window.cron,
                time_zone=window.time_zone,
                duration_minutes=window.duration_minutes,
                key=request_key(actor, "CreateFreezeWindow", request),
            ),
        )
        return convert.freeze_window(created)

    async def ListFreezeWindows(self, request, context):
        active_at = (
            freezes.check_instant("active_at", parse_timestamp("active_at", request.active_at))
            if request.HasField("active_at")
            else None
        )
        page = await freezes.list_windows(
            self.database,
            environment_id=optional_uuid("environment_id", request.environment_id),
            service_id=optional_uuid("service_id", request.service_id),
            active_at=active_at,
            requested_page_size=request.page_size,
            page_token=request.page_token,
        )
        return deploy_pb2.ListFreezeWindowsResponse(
            freeze_windows=[convert.freeze_window(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteFreezeWindow(self, request, context):
        window_id = parse_uuid("freeze_window_id", request.freeze_window_id)
        await freezes.delete_window(self.database, current_actor.get(), window_id)
        return empty_pb2.Empty()

    async def GetDoraMetrics(self, request, context):
        def moment(field: str):
            if not request.HasField(field):
                return None
            return parse_timestamp(field, getattr(request, field))

        interval = enum_word("interval", deploy_pb2.DoraInterval, request.interval, required=True)
        buckets = await dora.dora_metrics(
            self.database,
            service_id=optional_uuid("service_id", request.service_id),
            team_id=optional_uuid("team_id", request.team_id),
            environment_id=optional_uuid("environment_id", request.environment_id),
            start_time=moment("start_time"),
            end_time=moment("end_time"),
            interval=dora.Interval(interval),
        )
        return deploy_pb2.GetDoraMetricsResponse(buckets=[convert.dora_bucket(b) for b in buckets])

    async def CheckPromotion(self, request, context):
        release_id = parse_uuid("release_id", request.release_id)
        environment_id = parse_uuid("target_environment_id", request.target_environment_id)
        verdicts = await gates.check_promotion(
            self.database, current_actor.get(), release_id, environment_id
        )
        return convert.promotion_check(verdicts)


def register(server: grpc.aio.Server, resources: Resources) -> list[str]:
    resources.on_stop.append(sweeper.start(resources.database))
    resources.on_stop.append(dispatcher.start(resources.database, resources.settings))
    deploy_pb2_grpc.add_DeployServiceServicer_to_server(DeployServicer(resources), server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(resources), server)
    webhook_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(resources), server)
    return [DEPLOY_SERVICE.full_name, AUTH_SERVICE.full_name, WEBHOOK_SERVICE.full_name]
