"""Operations endpoints (admin): on-demand reconciliation and the live stock summary."""
from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from app.api.base import MAX_ID, Blueprint, Id
from app.api.context import container

blp = Blueprint("ops", __name__, url_prefix="/api/ops", description="Operations")


class ReconcileArgs(ma.Schema):
    dry_run = fields.Boolean(load_default=False, truthy={True}, falsy={False})
    variant_ids = fields.List(Id(), validate=validate.Length(1, 10_000), load_default=None)


class DriftRowSchema(ma.Schema):
    variant_id = fields.Integer()
    field = fields.String()
    expected = fields.Integer(allow_none=True)
    actual = fields.Integer(allow_none=True)


class ReconcileReportSchema(ma.Schema):
    checked = fields.Integer()
    drifted = fields.Integer()
    repaired = fields.Integer()
    skipped = fields.Integer(metadata={"description": "variants left for the next pass: a change was in flight"})
    rebuilt = fields.Integer(metadata={"description": "variants whose counters were missing and were built"})
    locks_finalized = fields.Integer()
    locks_released = fields.Integer()
    orders_finalized = fields.Integer(metadata={"description": "holds of committed orders that a failover brought "
                                                               "back, finalized again"})
    lost_holds = fields.Integer(metadata={"description": "holds found lost (a cart line whose hold vanished), "
                                                         "each reported once"})
    lost_hold_ids = fields.List(fields.String(), metadata={"description": "their item ids (at most 100)"})
    rows = fields.List(fields.Nested(DriftRowSchema))


@blp.route("/reconcile/", methods=["POST"])
@blp.arguments(ReconcileArgs(), required=False)
@blp.response(200, ReconcileReportSchema)
@blp.doc(summary="Compare the live counters with the database; repair unless dry_run",
         security=[{"bearer": []}])
def reconcile(args):
    args = args or {}
    report = container().reconciler.reconcile(args.get("variant_ids"), dry_run=args.get("dry_run", False))
    return report.as_dict()


MAX_SUMMARY_LIMIT = 500


class SummaryArgs(ma.Schema):
    limit = fields.Integer(load_default=50, validate=validate.Range(0, MAX_SUMMARY_LIMIT),
                           metadata={"description": "how many of the busiest variants (0 to 500)"})
    # query values are text: not Id(), which takes JSON integers only
    variant_id = fields.List(fields.Integer(validate=validate.Range(1, MAX_ID)), load_default=list,
                             validate=validate.Length(max=MAX_SUMMARY_LIMIT),
                             metadata={"description": "repeatable: variants listed besides the busiest"})


class SummaryVariantSchema(ma.Schema):
    variant_id = fields.Integer()
    sku = fields.String()
    on_hand = fields.Integer()
    available = fields.Integer()
    reserved = fields.Integer()
    active_holds = fields.Integer(metadata={"description": "holds not yet lapsed"})
    reservations_per_minute = fields.Integer(
        metadata={"description": "holds made or renewed in the last minute that are still live"})


class SummaryTotalsSchema(ma.Schema):
    on_hand = fields.Integer()
    available = fields.Integer()
    reserved = fields.Integer()
    holds_live = fields.Integer()


class InvariantSchema(ma.Schema):
    ok = fields.Boolean()
    violations = fields.List(fields.Integer())


class SweepJobSchema(ma.Schema):
    last_success_at = fields.String(allow_none=True)
    released = fields.Integer(allow_none=True)


class ReconcileJobSchema(ma.Schema):
    last_success_at = fields.String(allow_none=True)
    drifted = fields.Integer(allow_none=True)
    repaired = fields.Integer(allow_none=True)


class JobsSchema(ma.Schema):
    sweep = fields.Nested(SweepJobSchema)
    reconcile = fields.Nested(ReconcileJobSchema)


class ListenerSchema(ma.Schema):
    alive = fields.Boolean()
    lag_p99_ms = fields.Float(allow_none=True)


class SummarySchema(ma.Schema):
    variants = fields.List(fields.Nested(SummaryVariantSchema))
    totals = fields.Nested(SummaryTotalsSchema)
    holds_lapsing_next_minute = fields.Integer()
    reservations_per_second = fields.Float()
    refusals_per_second = fields.Float()
    invariant = fields.Nested(InvariantSchema)
    jobs = fields.Nested(JobsSchema)
    listener = fields.Nested(ListenerSchema)
    generated_at = fields.String()


@blp.route("/summary/", methods=["GET"])
@blp.arguments(SummaryArgs(), location="query")
@blp.response(200, SummarySchema)
@blp.alt_response(404, description="not_found: a variant_id asked for does not exist")
@blp.doc(summary="The live stock summary: busiest variants, totals, rates, invariant, jobs, listener",
         security=[{"bearer": []}])
def summary(args):
    return container().ops.summary(limit=args["limit"], variant_ids=args["variant_id"])
