-- llm-tower-jobs: stored OpenAI Responses answers (`store: true`), for
-- `previous_response_id` and `GET /v1/responses/{id}`. Scoped by tenant: the key is
-- (tenant, id), and every read names the tenant. `input` is the conversation's input
-- items (JSON array), `response` the answer as the client received it (JSON).
CREATE TABLE IF NOT EXISTS llm_responses (
    tenant     TEXT NOT NULL,
    id         TEXT NOT NULL,
    input      TEXT NOT NULL,
    response   TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS llm_responses_expires ON llm_responses (expires_at);
