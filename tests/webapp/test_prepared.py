"""webapp.prepared: a statement is prepared once per PostgreSQL connection, survives a rollback, is
prepared again on a new connection, and gives the same rows as the plain statement (elsewhere: plain)."""
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from webapp import prepared

SQL = "SELECT CAST(%s AS integer) + CAST(%s AS integer), 'a%%b', %s"


def run(params):
    with connection.cursor() as cursor:
        prepared.execute(cursor, "tandem_test_sum", SQL, params)
        return cursor.fetchall()


@pytest.mark.django_db(transaction=True)
def test_prepared_once_per_connection_and_same_rows():
    with connection.cursor() as cursor:
        cursor.execute(SQL, [2, 3, "x"])
        plain = cursor.fetchall()
    connection.close()  # whatever earlier tests prepared on this connection is gone
    with CaptureQueriesContext(connection) as first:
        assert run([2, 3, "x"]) == plain == [(5, "a%b", "x")]
    with pytest.raises(ZeroDivisionError), transaction.atomic():  # a rolled-back transaction
        assert run([1, 1, "it's"]) == [(2, "a%b", "it's")]
        raise ZeroDivisionError
    with CaptureQueriesContext(connection) as later:
        assert run([40, 2, None]) == [(42, "a%b", None)]
    statements = [q["sql"] for q in first.captured_queries + later.captured_queries]
    if connection.vendor == "postgresql":
        assert statements[0].startswith("PREPARE tandem_test_sum AS SELECT CAST($1 AS integer) + CAST($2 AS integer), 'a%b', $3")
        assert [s.split(" (")[0] for s in statements[1:]] == ["EXECUTE tandem_test_sum"] * 2
        connection.close()
        with CaptureQueriesContext(connection) as reconnected:
            assert run([1, 2, "y"]) == [(3, "a%b", "y")]
        assert reconnected.captured_queries[0]["sql"].startswith("PREPARE tandem_test_sum")
    else:
        assert all(s.startswith("SELECT") for s in statements)
