//! The SQL the library installs and sends, in one place.
//!
//! Why it is built this way: a grant and its fencing token must come back in
//! one round trip, and a grant must never outlive a failed statement. So an
//! acquisition is one statement ([`TRY_ACQUIRE`], then if that was not
//! granted [`ACQUIRE`], which waits) that takes the advisory lock and then
//! bumps the lock's token row in the same (autocommit) transaction (the
//! installed function `interlock_acquire_v1` does the same, for older
//! versions of interlock); the client receives the token only after that
//! transaction committed (the postgres crate's row stream ends at
//! ReadyForQuery, which the server sends after the commit). Session-level
//! advisory locks ignore ROLLBACK, so a statement that fails *after* the
//! grant would leave the session holding the lock: the client therefore
//! closes any session whose acquisition failed for a reason other than the
//! two that can only come from the wait itself (55P03 `lock_timeout`,
//! 40P01 deadlock; `lock_timeout` is reset to 0 before the token update).

/// The advisory key (bigint space) serialising schema installation.
/// FNV-1a-64 of `interlock:schema`.
pub(crate) const SCHEMA_KEY_NAME: &str = "interlock:schema";

/// Whether this database already has the current schema, and who we are.
pub(crate) const PROBE: &str = "SELECT pg_backend_pid(), \
     to_regprocedure('interlock_acquire_v1(smallint,bigint,integer,integer,boolean,integer,integer)') IS NOT NULL \
     AND to_regprocedure('interlock_release_v1(smallint,bigint,integer,integer,boolean,boolean)') IS NOT NULL \
     AND to_regprocedure('interlock_fence_check(bigint,bigint)') IS NOT NULL";

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
-- token. Raises SQLSTATE IL001 unless `tok` is the lock's newest token; on
-- success the token row stays share-locked until the caller's transaction
-- ends, so a new holder's grant (which updates that row) is ordered after
-- the caller's write. Use it inside the transaction that writes.
CREATE OR REPLACE FUNCTION interlock_fence_check(sp smallint, k bigint, tok bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    cur bigint;
BEGIN
    SELECT f.token INTO cur FROM interlock_fence f
        WHERE f.space = sp AND f.key = k FOR SHARE;
    IF cur IS NULL OR tok < cur THEN
        RAISE EXCEPTION 'stale fencing token % for lock (%, %): the newest is %', tok, sp, k, cur
            USING ERRCODE = 'IL001';
    END IF;
END
$fn$;

CREATE OR REPLACE FUNCTION interlock_fence_check(k bigint, tok bigint)
RETURNS void LANGUAGE sql AS $fn$ SELECT interlock_fence_check(1::smallint, k, tok) $fn$;
COMMIT;
"#;

/// A blocking acquisition (after a try that was not granted): the grant
/// after a wait in the server, and its token, in one round trip, as one
/// plain statement; the installed function `interlock_acquire_v1` does the
/// same (and older versions of interlock call it), but as a PL/pgSQL call it
/// costs the server about twice as much (docs/design-pg.md). Order within
/// it, each materialised CTE reading the one before: `t` sets
/// `lock_timeout` for this transaction only (`$6` ms, 0: no limit); `g`
/// waits for the advisory lock; `r` resets `lock_timeout` to 0, so that
/// the upsert `u` (the token, as in [`TRY_ACQUIRE`]) may wait for a row
/// lock (an `interlock_fence_check` in flight) without a 55P03: that error
/// can only come from the wait; then the lease. `$1`-`$5` as in
/// [`TRY_ACQUIRE`], `$6` the wait in ms (at least 0), `$7` the lease in ms.
pub const ACQUIRE: &str = "WITH t AS MATERIALIZED (SELECT set_config('lock_timeout', $6::integer::text, true) AS lt), \
   g AS MATERIALIZED (SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_advisory_lock_shared($2::bigint)::text ELSE pg_advisory_lock($2)::text END \
     ELSE \
       CASE WHEN $5 THEN pg_advisory_lock_shared($3::integer, $4::integer)::text ELSE pg_advisory_lock($3, $4)::text END \
     END AS got FROM t), \
   r AS MATERIALIZED (SELECT set_config('lock_timeout', '0', true) AS lt FROM g), \
   u AS (INSERT INTO interlock_fence AS f (space, key, token, granted_at, holder_pid) \
     SELECT $1, $2, 1, clock_timestamp(), pg_backend_pid() FROM r \
     ON CONFLICT (space, key) DO UPDATE \
     SET token = f.token + 1, granted_at = clock_timestamp(), holder_pid = pg_backend_pid() \
     RETURNING f.token) \
   SELECT (SELECT token FROM u), pg_backend_pid(), \
     set_config('idle_session_timeout', $7::integer::text, false)";

/// A try (every acquisition starts with one): the same grant and token as
/// `interlock_acquire_v1` with `wait_ms < 0`, as one plain statement, which
/// the server runs in about half the time of the PL/pgSQL function (no
/// function call and no SPI executions of its own statements; see
/// docs/design-pg.md). Order within it: the materialised CTE `g` takes the
/// advisory lock; the upsert `u` reads `g` (it inserts only if `g.got`), so
/// the token is bumped only after and only if the lock was granted; then
/// the lease (`idle_session_timeout`) is set if granted. A NULL token: not
/// granted, nothing changed. `$1` space, `$2` bigint key (or the fence key
/// of a pair), `$3`/`$4` the pair, `$5` shared, `$6` lease in ms.
pub const TRY_ACQUIRE: &str = "WITH g AS MATERIALIZED (SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_try_advisory_lock_shared($2::bigint) ELSE pg_try_advisory_lock($2) END \
     ELSE \
       CASE WHEN $5 THEN pg_try_advisory_lock_shared($3::integer, $4::integer) ELSE pg_try_advisory_lock($3, $4) END \
     END AS got), \
   u AS (INSERT INTO interlock_fence AS f (space, key, token, granted_at, holder_pid) \
     SELECT $1, $2, 1, clock_timestamp(), pg_backend_pid() FROM g WHERE g.got \
     ON CONFLICT (space, key) DO UPDATE \
     SET token = f.token + 1, granted_at = clock_timestamp(), holder_pid = pg_backend_pid() \
     RETURNING f.token) \
   SELECT (SELECT token FROM u), pg_backend_pid(), \
     CASE WHEN (SELECT got FROM g) THEN set_config('idle_session_timeout', $6::integer::text, false) END";

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

/// The newest token of a key.
pub(crate) const LAST_TOKEN: &str =
    "SELECT token FROM interlock_fence WHERE space = $1 AND key = $2";

#[cfg(test)]
mod tests {
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
