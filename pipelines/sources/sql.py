"""A table in any database SQLAlchemy reaches (PostgreSQL in production, SQLite embedded)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from pipelines.sources import SOURCE_URL_ENV, SourceError, Watermark, Watermarks


class SqlSource:
    def __init__(self, url: str, table: str, db_schema: str | None, watermarks: Watermarks, root: Path) -> None:
        try:
            parsed = make_url(url)
        except sa.exc.ArgumentError as exc:
            raise SourceError("source.sql.url is not a SQLAlchemy URL (e.g. "
                              "postgresql+psycopg://user:pass@host/db or sqlite:///data/source.db)") from exc
        shown = parsed.render_as_string(hide_password=True)  # as configured: the same in every clone
        database = parsed.database or ""
        file_db = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
        if file_db and not Path(database).is_absolute():
            parsed = parsed.set(database=str(root / database))  # relative to the project, not the current folder
        self.url, self.table_name, self.db_schema, self.watermarks = parsed, table, db_schema, watermarks
        where = f"{table}" if db_schema is None else f"{db_schema}.{table}"
        self.description = f"sql({shown}, table {where})"
        self.at_or_below_watermark: int | None = None  # rows at or below `low` in the table, counted by `read`

    def read(self, low: Watermark | None, high: Watermark | None) -> tuple[pd.DataFrame, int]:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                table = self._table(conn)
                column = self.watermarks.column
                assert column is not None  # config requires a watermark column of a sql source
                wm = table.c[column]
                query = sa.select(table).where(wm.is_not(None))
                if low is not None:
                    query = query.where(wm > self.watermarks.to_source(low))
                if high is not None:
                    query = query.where(wm <= self.watermarks.to_source(high))
                rows = pd.read_sql(query, conn)
                unreadable = conn.execute(sa.select(sa.func.count()).select_from(table).where(wm.is_(None))).scalar()
                if low is not None:  # more than were collected: rows that arrived late, never read (collect says so)
                    self.at_or_below_watermark = int(conn.execute(sa.select(sa.func.count()).select_from(table).where(
                        wm <= self.watermarks.to_source(low))).scalar() or 0)
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"cannot read {self.description}: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0]}; check source.sql in params.yaml or ${SOURCE_URL_ENV}"
                              ) from exc
        finally:
            engine.dispose()
        # ordered here, not by the database: the same (watermark, id or row content) order as every source
        return self.watermarks.ordered(rows), int(unreadable or 0)

    def state(self) -> None:
        """A table has no digest short of reading it: collect asks it for new rows every time."""
        return None

    def _table(self, conn: sa.Connection) -> sa.Table:
        try:
            table = sa.Table(self.table_name, sa.MetaData(), schema=self.db_schema, autoload_with=conn)
        except sa.exc.NoSuchTableError:
            raise SourceError(f"{self.description}: table not found; check source.sql.table in params.yaml") from None
        for col in (self.watermarks.column, self.watermarks.id_column):
            if col is not None and col not in table.c:
                raise SourceError(f"{self.description} has no column {col!r}: the watermark and id columns must exist")
        return table
