"""Database triggers that make a frozen batch immutable.

"Nothing in a frozen batch changes" spans several tables (the batch row, its comparisons, their
judgments, prompts and responses), which a CHECK constraint cannot see; triggers can. They refuse
with SQLSTATE 23000 on PostgreSQL and RAISE(ABORT) on SQLite, both surfacing as IntegrityError.
A judgment must also belong to the comparison of its assignment.
"""
from django.db import migrations

FROZEN = "SELECT 1 FROM annotation_batch b WHERE b.id = {batch} AND b.status = 'frozen'"
COMPARISON_FROZEN = (
    "SELECT 1 FROM annotation_comparison c JOIN annotation_batch b ON b.id = c.batch_id "
    "WHERE c.id = {comparison} AND b.status = 'frozen'"
)
RESPONSE_FROZEN = (
    "SELECT 1 FROM annotation_comparison c JOIN annotation_batch b ON b.id = c.batch_id "
    "WHERE (c.response_a_id = {response} OR c.response_b_id = {response}) AND b.status = 'frozen'"
)
PROMPT_FROZEN = (
    "SELECT 1 FROM annotation_comparison c JOIN annotation_batch b ON b.id = c.batch_id "
    "WHERE c.prompt_id = {prompt} AND b.status = 'frozen'"
)
WRONG_COMPARISON = (
    "SELECT 1 FROM annotation_assignment a WHERE a.id = {assignment} AND a.comparison_id <> {comparison}"
)

# (name, table, events, condition over OLD/NEW, message)
GUARDS = [
    ("batch_frozen", "annotation_batch", ["UPDATE", "DELETE"], "OLD.status = 'frozen'", "batch is frozen"),
    ("comparison_old_frozen", "annotation_comparison", ["UPDATE", "DELETE"],
     f"EXISTS ({FROZEN.format(batch='OLD.batch_id')})", "comparison belongs to a frozen batch"),
    ("comparison_new_frozen", "annotation_comparison", ["INSERT", "UPDATE"],
     f"EXISTS ({FROZEN.format(batch='NEW.batch_id')})", "cannot add a comparison to a frozen batch"),
    ("judgment_old_frozen", "annotation_judgment", ["UPDATE", "DELETE"],
     f"EXISTS ({COMPARISON_FROZEN.format(comparison='OLD.comparison_id')})", "judgment belongs to a frozen batch"),
    ("judgment_new_frozen", "annotation_judgment", ["INSERT", "UPDATE"],
     f"EXISTS ({COMPARISON_FROZEN.format(comparison='NEW.comparison_id')})", "cannot judge into a frozen batch"),
    ("judgment_assignment_match", "annotation_judgment", ["INSERT", "UPDATE"],
     f"EXISTS ({WRONG_COMPARISON.format(assignment='NEW.assignment_id', comparison='NEW.comparison_id')})",
     "judgment and its assignment name different comparisons"),
    ("response_frozen", "annotation_response", ["UPDATE", "DELETE"],
     f"EXISTS ({RESPONSE_FROZEN.format(response='OLD.id')})", "response belongs to a frozen batch"),
    ("prompt_frozen", "annotation_prompt", ["UPDATE", "DELETE"],
     f"EXISTS ({PROMPT_FROZEN.format(prompt='OLD.id')})", "prompt belongs to a frozen batch"),
]


def _sqlite(name, table, event, condition, message):
    condition = condition if event != "INSERT" else condition.replace("OLD.", "NEW.")
    return [
        f"DROP TRIGGER IF EXISTS guard_{name}_{event.lower()}",
        f"CREATE TRIGGER guard_{name}_{event.lower()} BEFORE {event} ON {table} FOR EACH ROW "
        f"WHEN {condition} BEGIN SELECT RAISE(ABORT, 'frozen batch guard: {message}'); END",
    ]


def _postgres(name, table, events, condition, message):
    function = f"guard_{name}"
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger AS $$
        BEGIN
            IF {condition} THEN
                RAISE EXCEPTION 'frozen batch guard: {message}' USING ERRCODE = '23000';
            END IF;
            IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""",
        f"DROP TRIGGER IF EXISTS {function} ON {table}",
        f"CREATE TRIGGER {function} BEFORE {' OR '.join(events)} ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


def install(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    statements = []
    for name, table, events, condition, message in GUARDS:
        if vendor == "postgresql":
            statements += _postgres(name, table, events, condition, message)
        elif vendor == "sqlite":
            for event in events:
                statements += _sqlite(name, table, event, condition, message)
        else:
            raise RuntimeError(f"frozen-batch guards are not written for {vendor}")
    for statement in statements:
        schema_editor.execute(statement)


def uninstall(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for name, table, events, _, _ in GUARDS:
        if vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS guard_{name} ON {table}")
            schema_editor.execute(f"DROP FUNCTION IF EXISTS guard_{name}()")
        else:
            for event in events:
                schema_editor.execute(f"DROP TRIGGER IF EXISTS guard_{name}_{event.lower()}")


def create_role_groups(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for name in ("annotator", "researcher"):
        Group.objects.get_or_create(name=name)


class Migration(migrations.Migration):
    dependencies = [("annotation", "0002_initial"), ("auth", "0012_alter_user_first_name_max_length")]

    operations = [
        migrations.RunPython(install, uninstall),
        migrations.RunPython(create_role_groups, migrations.RunPython.noop),
    ]
