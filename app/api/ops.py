"""Operations endpoints: on-demand reconciliation (admin)."""
from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from app.api.base import Blueprint, Id
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
