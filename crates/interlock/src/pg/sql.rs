//! The SQL the library installs and sends, in one place.
//!
//! Why it is built this way: a grant and its fencing token must come back in
//! one round trip, and a grant must never outlive a failed statement. So an
//! acquisition is one statement ([`TRY_ACQUIRE`], then if that was not
//! granted [`ACQUIRE`], which waits) that takes the advisory lock and then
//! issues the lock's token in the same (autocommit) transaction; the client
//! receives the token only after that transaction committed (the postgres
//! crate's row stream ends at ReadyForQuery, which the server sends after
//! the commit). Session-level advisory locks ignore ROLLBACK, so a statement
//! that fails *after* the grant would leave the session holding the lock:
//! the client therefore closes any session whose acquisition failed for a
//! reason other than the two that can only come from the wait itself (55P03
//! `lock_timeout`, 40P01 deadlock; `lock_timeout` is reset to 0 before the
//! token is written).
//!
//! Tokens come in batches (schema version 2): the key's row holds the
//! newest batch, `[lo, hi)`, and the session that owns it (`owner`, a
//! random id each session draws at connect: [`SESSION_ID`]). A grant by any
//! other session writes a new batch that starts above every token issued
//! (`interlock_batch_v2`), and gets its first value. A later try on the
//! owning session takes the next value of its own (the client passes the
//! last token it got, `prev`) without writing anything, if the row still
//! names it and that row version was never updated, locked or deleted: its
//! raw `xmax` is 0. That test is what makes the read safe although the
//! statement's snapshot was taken before the grant: a newer version of the
//! row can only come from an update of the version this snapshot sees,
//! which stores the updater's id in that version's `xmax` before the new
//! version can be visible; and nothing resets the `xmax` of a version a
//! committed transaction updated while a snapshot that sees it is alive
//! (freezing clears only lock-only or aborted ones). So "`xmax` = 0, read
//! after the grant" means "the newest version, with every commit before the
//! grant". A blocking wait always writes a new batch.

/// The advisory key (bigint space) serialising schema installation.
/// FNV-1a-64 of `interlock:schema`.
pub(crate) const SCHEMA_KEY_NAME: &str = "interlock:schema";

/// How many tokens a batch holds: the most grants one session may take
/// in a row without a write (see [`TRY_ACQUIRE`]). Spelled out in
/// [`INSTALL`], [`ACQUIRE`] as `1000`.
pub const BATCH: i64 = 1000;

/// Whether this database already has the current schema (version 2, and
/// the version 1 functions older interlocks call; the fence check's body is
/// version 2's, since an older interlock's install, racing ours on a new
/// database, would put back its own), who we are, and this session's id
/// for token batches ([`SESSION_ID`]'s expression).
pub(crate) const PROBE: &str = "SELECT pg_backend_pid(), \
     to_regprocedure('interlock_acquire_v1(smallint,bigint,integer,integer,boolean,integer,integer)') IS NOT NULL \
     AND to_regprocedure('interlock_release_v1(smallint,bigint,integer,integer,boolean,boolean)') IS NOT NULL \
     AND to_regprocedure('interlock_fence_check(bigint,bigint)') IS NOT NULL \
     AND to_regprocedure('interlock_batch_v2(smallint,bigint,text)') IS NOT NULL \
     AND coalesce((SELECT prosrc LIKE '%interlock schema 2%' FROM pg_proc \
       WHERE oid = to_regprocedure('interlock_fence_check(smallint,bigint,bigint)')), false), \
     gen_random_uuid()::text";

/// A session's id for token batches: 122 random bits from the server's
/// strong random source (PostgreSQL 13 or later). For the benchmark floors,
/// which send [`TRY_ACQUIRE`] raw; the library draws it in its probe.
pub const SESSION_ID: &str = "SELECT gen_random_uuid()::text";

/// Creates the token table and the functions (idempotent; run under a
/// transaction-level advisory lock so that concurrent first users do not
/// race on the catalog). `$KEY` is replaced by [`SCHEMA_KEY_NAME`]'s key.
pub(crate) const INSTALL: &str = r#"
BEGIN;
SELECT pg_advisory_xact_lock($KEY);
CREATE TABLE IF NOT EXISTS interlock_fence (
    space      smallint    NOT NULL,  -- 1: one bigint key; 2: a pair of int4 keys
    key        bigint      NOT NULL,  -- the bigint key, or key1 << 32 | key2 (as uint32)
    token      bigint      NOT NULL,  -- the last fencing token issued for this lock
    granted_at timestamptz NOT NULL,  -- when it was issued
    holder_pid integer     NOT NULL,  -- to which server backend
    PRIMARY KEY (space, key)
);
COMMENT ON TABLE interlock_fence IS
  'interlock PgLock fencing tokens: never lower or delete a row while the lock is in use';
-- Version 2: token batches. `lo` is the first token of the newest batch
-- (the lowest that interlock_fence_check accepts), `hi` its end
-- (exclusive), `owner` the session id that may issue lo + 1 .. hi - 1
-- without a write; `token` is the batch's top, hi - 1, so that an older
-- interlock (version 1), which bumps `token` by one and leaves the rest,
-- issues `hi`, above every token of the batch. NULL `lo`: the row was last
-- written by version 1 (or `token` >= `hi`: bumped by it since), and
-- `token` is the newest token.
-- (Only if missing: ALTER TABLE takes the table's exclusive lock, which
-- waits for every open transaction that touched the table.)
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute
                   WHERE attrelid = 'interlock_fence'::regclass AND attname = 'owner'
                     AND NOT attisdropped) THEN
        ALTER TABLE interlock_fence ADD COLUMN IF NOT EXISTS lo bigint,
            ADD COLUMN IF NOT EXISTS hi bigint,
            ADD COLUMN IF NOT EXISTS owner text;
    END IF;
END
$do$;

-- Writes a new batch for the key, starting above every token issued
-- (`token` + 1), and returns its first token. The statement gets its own
-- snapshot, and an UPDATE in READ COMMITTED follows a concurrent update to
-- the newest version. A plain UPDATE, not an upsert, when the row exists:
-- ON CONFLICT DO UPDATE locks the row before updating it and leaves that
-- lock's id in the new version's xmax, which would make the next try's
-- `xmax = 0` test fail. (For the same reason the table has no row
-- trigger: a BEFORE UPDATE trigger locks the row too.)
CREATE OR REPLACE FUNCTION interlock_batch_v2(sp smallint, k bigint, sid text)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    t bigint;
BEGIN
    UPDATE interlock_fence f
        SET lo = f.token + 1, hi = f.token + 1001, token = f.token + 1000,
            owner = sid, granted_at = clock_timestamp(), holder_pid = pg_backend_pid()
        WHERE f.space = sp AND f.key = k
        RETURNING f.lo INTO t;
    IF NOT FOUND THEN
        INSERT INTO interlock_fence AS f (space, key, token, lo, hi, owner, granted_at, holder_pid)
            VALUES (sp, k, 1000, 1, 1001, sid, clock_timestamp(), pg_backend_pid())
            ON CONFLICT (space, key) DO UPDATE
            SET lo = f.token + 1, hi = f.token + 1001, token = f.token + 1000,
                owner = sid, granted_at = clock_timestamp(), holder_pid = pg_backend_pid()
            RETURNING f.lo INTO t;
    END IF;
    RETURN t;
END
$fn$;

CREATE OR REPLACE FUNCTION interlock_acquire_v1(
    sp smallint, k bigint, k1 integer, k2 integer, shared boolean,
    wait_ms integer,   -- < 0: try only; 0: wait forever; > 0: lock_timeout in ms
    lease_ms integer,  -- idle_session_timeout while held (0: none)
    OUT token bigint, OUT backend integer)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    got boolean := true;
BEGIN
    backend := pg_backend_pid();
    IF wait_ms < 0 THEN
        IF sp = 1 THEN
            IF shared THEN got := pg_try_advisory_lock_shared(k);
            ELSE got := pg_try_advisory_lock(k); END IF;
        ELSE
            IF shared THEN got := pg_try_advisory_lock_shared(k1, k2);
            ELSE got := pg_try_advisory_lock(k1, k2); END IF;
        END IF;
        IF NOT got THEN
            RETURN;  -- token NULL: not granted
        END IF;
    ELSE
        PERFORM set_config('lock_timeout', wait_ms::text, true);
        IF sp = 1 THEN
            IF shared THEN PERFORM pg_advisory_lock_shared(k);
            ELSE PERFORM pg_advisory_lock(k); END IF;
        ELSE
            IF shared THEN PERFORM pg_advisory_lock_shared(k1, k2);
            ELSE PERFORM pg_advisory_lock(k1, k2); END IF;
        END IF;
        PERFORM set_config('lock_timeout', '0', true);
    END IF;
    -- Held: a silent session is ended by the server after the lease.
    PERFORM set_config('idle_session_timeout', lease_ms::text, false);
    INSERT INTO interlock_fence AS f (space, key, token, granted_at, holder_pid)
        VALUES (sp, k, 1, clock_timestamp(), backend)
        ON CONFLICT (space, key) DO UPDATE
        SET token = f.token + 1, granted_at = clock_timestamp(), holder_pid = backend
        RETURNING f.token INTO token;
END
$fn$;

CREATE OR REPLACE FUNCTION interlock_release_v1(
    sp smallint, k bigint, k1 integer, k2 integer, shared boolean,
    last boolean)  -- the session holds no other interlock lock
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    ok boolean;
BEGIN
    IF sp = 1 THEN
        IF shared THEN ok := pg_advisory_unlock_shared(k);
        ELSE ok := pg_advisory_unlock(k); END IF;
    ELSE
        IF shared THEN ok := pg_advisory_unlock_shared(k1, k2);
        ELSE ok := pg_advisory_unlock(k1, k2); END IF;
    END IF;
    IF last THEN
        PERFORM set_config('idle_session_timeout', '0', false);
    END IF;
    RETURN ok;
END
$fn$;

-- For a resource kept in this database: refuse a write made under a stale
-- token. Raises SQLSTATE IL001 if `tok` is below the first token of the
-- lock's newest batch (below every token issued since the last grant by
-- another session, or since the first grant after a check: the check's
-- row lock makes that grant write a new batch); on success the token row
-- stays share-locked until the caller's transaction ends, so a new
-- holder's grant that writes the row is ordered after the caller's write.
-- Use it inside the transaction that writes.
CREATE OR REPLACE FUNCTION interlock_fence_check(sp smallint, k bigint, tok bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    cur bigint;
BEGIN
    -- interlock schema 2 (the probe looks for this line)
    SELECT CASE WHEN f.lo IS NULL OR f.token >= f.hi THEN f.token ELSE f.lo END INTO cur
        FROM interlock_fence f
        WHERE f.space = sp AND f.key = k FOR SHARE;
    IF cur IS NULL OR tok < cur THEN
        RAISE EXCEPTION 'stale fencing token % for lock (%, %): the lowest accepted is %', tok, sp, k, cur
            USING ERRCODE = 'IL001';
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION interlock_fence_check(k bigint, tok bigint)
RETURNS void LANGUAGE sql AS $fn$ SELECT interlock_fence_check(1::smallint, k, tok) $fn$;
COMMIT;
"#;

/// A blocking acquisition (after a try that was not granted): the grant
/// after a wait in the server, and a new token batch, in one round trip, as
/// one plain statement (the installed function `interlock_acquire_v1` is
/// kept for older versions of interlock, and as a PL/pgSQL call it costs
/// the server about twice as much: docs/design-pg.md). Order within it,
/// each materialised CTE reading the one before: `t` sets `lock_timeout`
/// for this transaction only (`$6` ms, 0: no limit); `g` waits for the
/// advisory lock; `r` resets `lock_timeout` to 0, so that the upsert `u`
/// (a new batch, as `interlock_batch_v2` writes it) may wait for a row
/// lock (an `interlock_fence_check` in flight) without a 55P03: that error
/// can only come from the wait; then the lease. A wait always writes: the
/// holder it waited for was another session, whose grant moved the batch.
/// The upsert leaves its row lock's id in the new version's `xmax`, so the
/// session's next try writes once more. `$1`-`$5` as in [`TRY_ACQUIRE`],
/// `$6` the wait in ms (at least 0), `$7` the lease in ms, `$8` the
/// session id.
pub const ACQUIRE: &str = "WITH t AS MATERIALIZED (SELECT set_config('lock_timeout', $6::integer::text, true) AS lt), \
   g AS MATERIALIZED (SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_advisory_lock_shared($2::bigint)::text ELSE pg_advisory_lock($2)::text END \
     ELSE \
       CASE WHEN $5 THEN pg_advisory_lock_shared($3::integer, $4::integer)::text ELSE pg_advisory_lock($3, $4)::text END \
     END AS got FROM t), \
   r AS MATERIALIZED (SELECT set_config('lock_timeout', '0', true) AS lt FROM g), \
   u AS (INSERT INTO interlock_fence AS f (space, key, token, lo, hi, owner, granted_at, holder_pid) \
     SELECT $1, $2, 1000, 1, 1001, $8::text, clock_timestamp(), pg_backend_pid() FROM r \
     ON CONFLICT (space, key) DO UPDATE \
     SET lo = f.token + 1, hi = f.token + 1001, token = f.token + 1000, \
       owner = $8, granted_at = clock_timestamp(), holder_pid = pg_backend_pid() \
     RETURNING f.lo) \
   SELECT (SELECT lo FROM u), pg_backend_pid(), \
     set_config('idle_session_timeout', $7::integer::text, false)";

/// A try (every acquisition starts with one): the grant and its token in
/// one plain statement. Order within it: the subquery `g` (`OFFSET 0`
/// keeps it a subquery, evaluated before the outer target list) takes the
/// advisory lock; only if granted (the `CASE`, which evaluates only the
/// branch it needs) the token: the owning session's next value if the row
/// still names this session (`$7`), `$8` (the last token this session got
/// for the key) is in its batch with room after it, and the row version's
/// raw `xmax` is 0 (see the module documentation: that is what makes this
/// read, under a snapshot taken before the grant, safe); else (`coalesce`
/// evaluates its second argument only then) a new batch,
/// `interlock_batch_v2`. Then the lease (`idle_session_timeout`) if
/// granted. A NULL token: not granted, nothing changed. `$1` space, `$2`
/// bigint key (or the fence key of a pair), `$3`/`$4` the pair, `$5`
/// shared, `$6` lease in ms, `$7` the session id, `$8` the session's last
/// token of this key (NULL: none).
pub const TRY_ACQUIRE: &str = "SELECT CASE WHEN g.got THEN coalesce( \
       (SELECT $8::bigint + 1 FROM interlock_fence f \
         WHERE f.space = $1 AND f.key = $2 AND g.got AND f.owner = $7::text \
           AND f.xmax = '0'::xid AND f.lo <= $8 AND $8 + 1 < f.hi), \
       interlock_batch_v2($1, $2, $7)) END, \
     pg_backend_pid(), \
     CASE WHEN g.got THEN set_config('idle_session_timeout', $6::integer::text, false) END \
   FROM (SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_try_advisory_lock_shared($2::bigint) ELSE pg_try_advisory_lock($2) END \
     ELSE \
       CASE WHEN $5 THEN pg_try_advisory_lock_shared($3::integer, $4::integer) ELSE pg_try_advisory_lock($3, $4) END \
     END AS got OFFSET 0) g";

/// The release: `interlock_release_v1` as one plain statement. `$1`-`$5`
/// as in [`TRY_ACQUIRE`], `$6` whether the session holds no other
/// interlock lock (then the lease ends: `idle_session_timeout` back to 0).
pub const RELEASE: &str = "SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_advisory_unlock_shared($2::bigint) ELSE pg_advisory_unlock($2) END \
     ELSE \
       CASE WHEN $5 THEN pg_advisory_unlock_shared($3::integer, $4::integer) ELSE pg_advisory_unlock($3, $4) END \
     END, \
     CASE WHEN $6::boolean THEN set_config('idle_session_timeout', '0', false) END";

/// Who holds or awaits a key, from `pg_locks` and `pg_stat_activity`, in
/// this database. `$1` space, `$2` fence key, `$3` classid, `$4` objid,
/// `$5` objsubid.
pub(crate) const HOLDERS: &str = "SELECT l.pid, host(a.client_addr), a.application_name, \
       l.mode, l.granted, \
       CASE WHEN l.granted THEN f.granted_at ELSE l.waitstart END \
     FROM pg_locks l \
     LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     LEFT JOIN interlock_fence f ON f.space = $1 AND f.key = $2 AND f.holder_pid = l.pid \
     WHERE l.locktype = 'advisory' \
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND l.classid = $3 AND l.objid = $4 AND l.objsubid = $5 \
     ORDER BY l.granted DESC, l.waitstart NULLS FIRST, l.pid";

/// The first token of a key's newest batch.
pub(crate) const LAST_TOKEN: &str =
    "SELECT CASE WHEN lo IS NULL OR token >= hi THEN token ELSE lo END \
     FROM interlock_fence WHERE space = $1 AND key = $2";

#[cfg(test)]
mod tests {
    /// The batch size is spelled out in the SQL; it must be [`super::BATCH`].
    #[test]
    fn statements_spell_the_batch_size() {
        let (b, end) = (super::BATCH, super::BATCH + 1);
        for (name, sql) in [("INSTALL", super::INSTALL), ("ACQUIRE", super::ACQUIRE)] {
            assert!(sql.contains(&format!("token + {end}")), "{name}");
            assert!(sql.contains(&format!("token + {b},")), "{name}");
            assert!(sql.contains(&format!("1, {end},")), "{name}");
        }
    }

    /// The floors (the pg bench's, the sqlx peer's, the harness's
    /// floor-pg) must send these very statements: they import them from
    /// `interlock::pg` (the sqlx peer too, through its path dependency)
    /// and keep no SQL literal of their own that could drift.
    #[test]
    fn floors_send_the_library_statements() {
        for (file, src) in [
            ("benches/pg.rs", include_str!("../../benches/pg.rs")),
            (
                "peers/sqlx-pg/src/main.rs",
                include_str!("../../../interlock-bench/peers/sqlx-pg/src/main.rs"),
            ),
            (
                "interlock-bench/src/families.rs",
                include_str!("../../../interlock-bench/src/families.rs"),
            ),
        ] {
            assert!(src.contains("use interlock::pg::{"), "{file} imports");
            for name in ["TRY_ACQUIRE", "RELEASE"] {
                assert!(
                    src.contains(&format!("prepare({name})")),
                    "{file} sends {name}"
                );
                assert!(
                    !src.contains(&format!("const {name}")),
                    "{file} has its own {name}"
                );
            }
            for sql in [
                "interlock_fence",
                "pg_try_advisory_lock_shared",
                "interlock_acquire_v1(",
            ] {
                assert!(!src.contains(sql), "{file} spells out PgLock's SQL ({sql})");
            }
        }
    }
}
