"""Shapes fixed by the API (docs/api.md), written out once for the tests that check responses."""

# docs/api.md, "Operations": the Operation object and its steps.
OPERATION_FIELDS = {
    "id",
    "org_id",
    "kind",
    "state",
    "trigger",
    "policy_id",
    "source_endpoint_id",
    "new_endpoint_id",
    "provider_id",
    "parent_id",
    "steps",
    "deadline_at",
    "error",
    "created_at",
    "updated_at",
    "finished_at",
}
STEP_FIELDS = {
    "name",
    "state",
    "attempts",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "last_error",
}
