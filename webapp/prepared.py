"""Server-side prepared statements, on PostgreSQL, for the one statement every API request runs: the
token lookup (webapp.auth). The judgment submission went back to the ORM (annotation.services).

psycopg2 sends each statement as text, so PostgreSQL parses and plans it again on every request:
for the submission's locking read that was 0.3 ms of the database's CPU per request, twice what
running it costs (docs/benchmarks.md, "Judgment submission"). A statement run through
`execute` is prepared once per database connection under its name, then run with EXECUTE. PREPARE
is not transactional (the statement survives the rollback of the transaction it was made in), so a
name is remembered per raw connection and forgotten with it. Other databases run the SQL as it is.
Named statements live in a server session: behind a pooler in transaction mode (PgBouncer before
1.21, or without its max_prepared_statements) connect straight to PostgreSQL or pool by session.
"""
import re
from collections.abc import Sequence

_PLACEHOLDER = re.compile(r"%s|%%")


def execute(cursor, name: str, sql: str, params: Sequence) -> None:
    """cursor.execute(sql, params), as the prepared statement `name` on PostgreSQL.

    `sql` uses %s placeholders as usual; one name stands for one SQL text on a connection.
    """
    db = cursor.db  # the connection this cursor belongs to (Django's cursor wrapper)
    if db.vendor != "postgresql":
        cursor.execute(sql, params)
        return
    raw = db.connection
    state = getattr(db, "_tandem_prepared", None)
    if state is None or state[0] is not raw:  # a new connection (or the first use): nothing prepared on it
        state = db._tandem_prepared = (raw, set())
    if name not in state[1]:
        numbers = iter(range(1, len(params) + 1))
        numbered = _PLACEHOLDER.sub(lambda m: f"${next(numbers)}" if m.group() == "%s" else "%", sql)
        cursor.execute(f"PREPARE {name} AS {numbered}")
        state[1].add(name)
    if params:
        cursor.execute(f"EXECUTE {name} ({', '.join(['%s'] * len(params))})", params)
    else:
        cursor.execute(f"EXECUTE {name}")
