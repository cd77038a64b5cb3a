-- llm-tower-jobs: the LLM calls made inside durable steps, so that a re-run of a step
-- whose attempt died after the upstream answered reuses the recorded answer instead of
-- paying for a second call. `response` is NULL while a call is started but unanswered;
-- `starts` counts the attempts that started it.
CREATE TABLE IF NOT EXISTS llm_job_calls (
    job_id      TEXT NOT NULL REFERENCES llm_jobs (id) ON DELETE CASCADE,
    call_key    TEXT NOT NULL,
    starts      BIGINT NOT NULL DEFAULT 1,
    response    TEXT,
    created_at  BIGINT NOT NULL,
    answered_at BIGINT,
    PRIMARY KEY (job_id, call_key)
);
