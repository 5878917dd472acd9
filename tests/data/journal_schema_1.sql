-- The journal schema of version 1 (before state_counts), for the migration test.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    seq INTEGER PRIMARY KEY,            -- batch order; issue order
    uid TEXT NOT NULL UNIQUE,           -- SeriesInstanceUID
    study_uid TEXT,
    patient_id TEXT,
    batch_line INTEGER,
    state TEXT NOT NULL,
    expected INTEGER,                   -- NumberOfSeriesRelatedInstances (or IMAGE count)
    received INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    verified TEXT,                      -- "count" | "stable-count"
    reason TEXT,
    warning TEXT,
    next_attempt_at REAL,
    job_id TEXT,
    move_method TEXT,
    issued_at REAL,                     -- current attempt
    first_issued_at REAL,
    finished_at REAL,
    seconds REAL,                       -- first issue to complete
    sop_uids TEXT,                      -- JSON list, when known from an IMAGE-level C-FIND
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state_seq ON series (state, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    uid TEXT,                           -- NULL for run-level events (throttle, run start)
    event TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_uid ON events (uid);
CREATE TABLE IF NOT EXISTS studies (   -- study rows of the batch and what they expanded to
    study_uid TEXT PRIMARY KEY,
    batch_line INTEGER,
    found INTEGER NOT NULL,             -- series the source has
    planned INTEGER NOT NULL,           -- series left after the filters
    reason TEXT                         -- why nothing was planned
);
