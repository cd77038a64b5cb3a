-- llm-tower-jobs: the job queue and the recorded step outputs (PostgreSQL).
-- Timestamps are Unix milliseconds (wall clock).
CREATE TABLE IF NOT EXISTS llm_jobs (
    id              TEXT PRIMARY KEY NOT NULL,
    tenant          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    input           TEXT NOT NULL,
    idempotency_key TEXT,
    status          TEXT NOT NULL,
    priority        BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    max_attempts    BIGINT NOT NULL DEFAULT 1,
    timeout_ms      BIGINT,
    backoff_ms      BIGINT NOT NULL DEFAULT 1000,
    run_at          BIGINT NOT NULL,
    lease_epoch     BIGINT NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_token     TEXT,
    lease_expires   BIGINT,
    result          TEXT,
    error           TEXT,
    progress        TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    expires_at      BIGINT,
    UNIQUE (tenant, idempotency_key)
);

CREATE INDEX IF NOT EXISTS llm_jobs_queue ON llm_jobs (status, priority DESC, run_at);
CREATE INDEX IF NOT EXISTS llm_jobs_expires ON llm_jobs (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS llm_job_steps (
    job_id     TEXT NOT NULL REFERENCES llm_jobs (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    output     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);
