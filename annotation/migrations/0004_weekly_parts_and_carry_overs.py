"""A week goes on in a new batch when its batch is frozen early, and a freeze carries unfinished work over.

Batches: one OPEN weekly batch per ISO week (no longer one per week); the parts of a week are numbered
1, 2, ... ("2026-W49", "2026-W49.2"). Comparisons: a carry-over (`carried_from`) repeats the pair of
the frozen comparison it continues, so the pair is unique among originals only.

Rules that span rows are triggers, as in 0003 (SQLSTATE 23000 on PostgreSQL, RAISE(ABORT) on SQLite,
both an IntegrityError):
- a carry-over has the prompt and the two responses of the comparison it carries;
- no assignment is leased on a comparison of a frozen batch (so the queue cannot hand one out, and a
  lease open on a batch cannot outlive its freeze);
- a batch freezes only when none of its comparisons is leased (batch_freeze moves leases first);
- an assignment changes comparison only while leased, and only to its comparison's carry-over;
- an annotator is given a pair of responses once, whichever comparison (original or carry-over) holds it.
The UPDATE triggers name their columns, so a submission's status update does not run the pair check.
"""
from importlib import import_module

import django.db.models.deletion
from django.db import migrations, models

FROZEN_GUARDS = import_module("annotation.migrations.0003_frozen_batch_guards")

SAME_PAIR = (
    "NEW.carried_from_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM annotation_comparison p "
    "WHERE p.id = NEW.carried_from_id AND p.prompt_id = NEW.prompt_id "
    "AND p.response_a_id = NEW.response_a_id AND p.response_b_id = NEW.response_b_id)"
)
LEASED_ON_FROZEN = (
    "NEW.status = 'leased' AND EXISTS (SELECT 1 FROM annotation_comparison c "
    "JOIN annotation_batch b ON b.id = c.batch_id WHERE c.id = NEW.comparison_id AND b.status = 'frozen')"
)
FROZEN_WITH_LEASES = (
    "NEW.status = 'frozen' AND OLD.status <> 'frozen' AND EXISTS (SELECT 1 FROM annotation_assignment a "
    "JOIN annotation_comparison c ON c.id = a.comparison_id WHERE c.batch_id = NEW.id AND a.status = 'leased')"
)
MOVED_ELSEWHERE = (
    "NEW.comparison_id <> OLD.comparison_id AND (OLD.status <> 'leased' OR NOT EXISTS ("
    "SELECT 1 FROM annotation_comparison c WHERE c.id = NEW.comparison_id AND c.carried_from_id = OLD.comparison_id))"
)
PAIR_SEEN = (  # {other}: "is not the row itself", written per database (NEW.id is unset in SQLite's BEFORE INSERT)
    "EXISTS (SELECT 1 FROM annotation_comparison n JOIN annotation_comparison s "
    "ON s.response_a_id = n.response_a_id AND s.response_b_id = n.response_b_id "
    "JOIN annotation_assignment a ON a.comparison_id = s.id "
    "WHERE n.id = NEW.comparison_id AND a.annotator_id = NEW.annotator_id AND {other})"
)

# (name, table, events, condition over NEW/OLD, message)
GUARDS = [
    ("carry_over_same_pair", "annotation_comparison",
     ["INSERT", "UPDATE OF carried_from_id, prompt_id, response_a_id, response_b_id"], SAME_PAIR,
     "a carry-over has the prompt and responses of the comparison it carries"),
    ("lease_on_frozen", "annotation_assignment", ["INSERT", "UPDATE OF status, comparison_id"], LEASED_ON_FROZEN,
     "cannot lease a comparison of a frozen batch"),
    ("freeze_with_leases", "annotation_batch", ["UPDATE OF status"], FROZEN_WITH_LEASES,
     "a batch freezes only after its leases are carried over"),
    ("assignment_moves_to_carry_over", "annotation_assignment", ["UPDATE OF comparison_id"], MOVED_ELSEWHERE,
     "an assignment moves only while leased, to the carry-over of its comparison"),
    ("assignment_pair_once", "annotation_assignment", ["INSERT", "UPDATE OF comparison_id, annotator_id"], PAIR_SEEN,
     "this annotator was already given this pair of responses"),
]


def _sqlite(name, table, event, condition, message):
    trigger = f"guard_{name}_{event.split()[0].lower()}"
    condition = condition.replace("{other}", "a.id IS NOT NEW.id")
    return [
        f"DROP TRIGGER IF EXISTS {trigger}",
        f"CREATE TRIGGER {trigger} BEFORE {event} ON {table} FOR EACH ROW "
        f"WHEN {condition} BEGIN SELECT RAISE(ABORT, 'annotation guard: {message}'); END",
    ]


def _postgres(name, table, events, condition, message):
    function = f"guard_{name}"
    condition = condition.replace("{other}", "a.id IS DISTINCT FROM NEW.id")
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$
        BEGIN
            IF {condition} THEN
                RAISE EXCEPTION 'annotation guard: {message}' USING ERRCODE = '23000';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""",
        f"DROP TRIGGER IF EXISTS {function} ON {table}",
        f"CREATE TRIGGER {function} BEFORE {' OR '.join(events)} ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


def install(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for name, table, events, condition, message in GUARDS:
        if vendor == "postgresql":
            statements = _postgres(name, table, events, condition, message)
        elif vendor == "sqlite":
            statements = [s for event in events for s in _sqlite(name, table, event, condition, message)]
        else:
            raise RuntimeError(f"carry-over guards are not written for {vendor}")
        for statement in statements:
            schema_editor.execute(statement)


def _sqlite_only(step):
    """SQLite rebuilds a table to add a column or a constraint, and a trigger that names the table breaks the
    rebuild: there 0003's guards are lifted around this migration's schema changes and put back after."""
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "sqlite":
            step(apps, schema_editor)
    return run


def uninstall(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for name, table, events, _, _ in GUARDS:
        if vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS guard_{name} ON {table}")
            schema_editor.execute(f"DROP FUNCTION IF EXISTS guard_{name}()")
        else:
            for event in events:
                schema_editor.execute(f"DROP TRIGGER IF EXISTS guard_{name}_{event.split()[0].lower()}")


class Migration(migrations.Migration):

    dependencies = [
        ('annotation', '0003_frozen_batch_guards'),
    ]

    operations = [
        migrations.RunPython(_sqlite_only(FROZEN_GUARDS.uninstall), _sqlite_only(FROZEN_GUARDS.install)),
        migrations.RemoveConstraint(
            model_name='batch',
            name='batch_one_per_iso_week',
        ),
        migrations.RemoveConstraint(
            model_name='comparison',
            name='comparison_pair_unique',
        ),
        migrations.AddField(
            model_name='batch',
            name='part',
            field=models.PositiveSmallIntegerField(default=1, help_text="The week's first batch is part 1; one opened after it froze mid-week is part 2, ..."),
        ),
        migrations.AddField(
            model_name='comparison',
            name='carried_from',
            field=models.OneToOneField(blank=True, help_text='The comparison of a frozen batch whose remaining judgments this one collects', null=True, on_delete=django.db.models.deletion.PROTECT, related_name='carried_to', to='annotation.comparison'),
        ),
        migrations.AddConstraint(
            model_name='batch',
            constraint=models.CheckConstraint(condition=models.Q(('part__gte', 1)), name='batch_part_positive'),
        ),
        migrations.AddConstraint(
            model_name='batch',
            constraint=models.UniqueConstraint(condition=models.Q(('kind', 'weekly'), ('status', 'open')), fields=('iso_year', 'iso_week'), name='batch_one_open_per_iso_week'),
        ),
        migrations.AddConstraint(
            model_name='batch',
            constraint=models.UniqueConstraint(condition=models.Q(('kind', 'weekly')), fields=('iso_year', 'iso_week', 'part'), name='batch_week_part_unique'),
        ),
        migrations.AddConstraint(
            model_name='comparison',
            constraint=models.UniqueConstraint(condition=models.Q(('carried_from__isnull', True)), fields=('response_a', 'response_b'), name='comparison_pair_unique'),
        ),
        migrations.RunPython(_sqlite_only(FROZEN_GUARDS.install), _sqlite_only(FROZEN_GUARDS.uninstall)),
        migrations.RunPython(install, uninstall),
    ]
