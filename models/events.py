"""Event types a platform publishes and endpoints subscribe to (docs/api.md, "Event types")."""

from __future__ import annotations

from receiver.handoff import HANDOFF_EVENT

SUBSCRIBABLE_EVENT_TYPES: frozenset[str] = frozenset(
    {
        "brand.vetted",
        "brand.vetting_failed",
        "campaign.approved",
        "campaign.rejected",
        "campaign.shared",
        "wallet.balance_low",
        "wallet.balance_zero",
        "subscription.past_due",
        "subscription.canceled",
        "api_key.created",
        "api_key.rotated",
        "api_key.revoked",
        "phone_number.bulk_order.completed",
        "phone_number.campaign.assigned",
        "consent_pending.confirmed",
        "consent_pending.expired",
        "lookup.completed",
    }
)

# Sent by Rotator itself, never subscribed to.
TEST_EVENT = "webhook.test"
SYSTEM_EVENT_TYPES: frozenset[str] = frozenset({TEST_EVENT, HANDOFF_EVENT})

SUPPORTED_API_VERSIONS: tuple[str, ...] = ("2026-04-01",)
