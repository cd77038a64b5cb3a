//! [`ResponseStore`] for the two job stores: stored Responses answers live in the same
//! database as the jobs (table `llm_responses`, keyed by tenant and id).

use llm_tower_core::LlmError;
use llm_tower_core::dialect::responses::{ResponseStore, StoreFuture, StoredResponse};
use sqlx::Row;

use super::{PostgresStore, SqliteStore};

fn store_error(e: impl std::fmt::Display) -> LlmError {
    LlmError::unavailable(format!("response store: {e}"))
}

fn row_to_stored(
    tenant: String,
    id: String,
    input: &str,
    response: String,
    created_at: i64,
    expires_at: i64,
) -> Result<StoredResponse, LlmError> {
    Ok(StoredResponse {
        id,
        tenant,
        input: serde_json::from_str(input).map_err(store_error)?,
        response: response.into(),
        created_at,
        expires_at,
    })
}

macro_rules! impl_response_store {
    ($store:ty, $upsert:literal, $get:literal, $delete:literal, $purge:literal) => {
        impl ResponseStore for $store {
            fn put_response(&self, r: StoredResponse) -> StoreFuture<'_, ()> {
                Box::pin(async move {
                    let response = std::str::from_utf8(&r.response).map_err(store_error)?;
                    sqlx::query($upsert)
                        .bind(&r.tenant)
                        .bind(&r.id)
                        .bind(r.input.to_string())
                        .bind(response)
                        .bind(r.created_at)
                        .bind(r.expires_at)
                        .execute(self.pool())
                        .await
                        .map_err(store_error)?;
                    Ok(())
                })
            }

            fn get_response<'a>(
                &'a self,
                tenant: &'a str,
                id: &'a str,
                now: i64,
            ) -> StoreFuture<'a, Option<StoredResponse>> {
                Box::pin(async move {
                    let row = sqlx::query($get)
                        .bind(tenant)
                        .bind(id)
                        .bind(now)
                        .fetch_optional(self.pool())
                        .await
                        .map_err(store_error)?;
                    row.map(|r| {
                        let input: String = r.try_get("input").map_err(store_error)?;
                        let response: String = r.try_get("response").map_err(store_error)?;
                        row_to_stored(
                            tenant.to_owned(),
                            id.to_owned(),
                            &input,
                            response,
                            r.try_get("created_at").map_err(store_error)?,
                            r.try_get("expires_at").map_err(store_error)?,
                        )
                    })
                    .transpose()
                })
            }

            fn delete_response<'a>(
                &'a self,
                tenant: &'a str,
                id: &'a str,
            ) -> StoreFuture<'a, bool> {
                Box::pin(async move {
                    let r = sqlx::query($delete)
                        .bind(tenant)
                        .bind(id)
                        .execute(self.pool())
                        .await
                        .map_err(store_error)?;
                    Ok(r.rows_affected() > 0)
                })
            }

            fn purge_expired_responses(&self, now: i64) -> StoreFuture<'_, u64> {
                Box::pin(async move {
                    let r = sqlx::query($purge)
                        .bind(now)
                        .execute(self.pool())
                        .await
                        .map_err(store_error)?;
                    Ok(r.rows_affected())
                })
            }
        }
    };
}

impl_response_store!(
    SqliteStore,
    "INSERT INTO llm_responses (tenant, id, input, response, created_at, expires_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (tenant, id) DO UPDATE SET \
     input = excluded.input, response = excluded.response, \
     created_at = excluded.created_at, expires_at = excluded.expires_at",
    "SELECT input, response, created_at, expires_at FROM llm_responses \
     WHERE tenant = ?1 AND id = ?2 AND expires_at > ?3",
    "DELETE FROM llm_responses WHERE tenant = ?1 AND id = ?2",
    "DELETE FROM llm_responses WHERE expires_at <= ?1"
);

impl_response_store!(
    PostgresStore,
    "INSERT INTO llm_responses (tenant, id, input, response, created_at, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, id) DO UPDATE SET \
     input = excluded.input, response = excluded.response, \
     created_at = excluded.created_at, expires_at = excluded.expires_at",
    "SELECT input, response, created_at, expires_at FROM llm_responses \
     WHERE tenant = $1 AND id = $2 AND expires_at > $3",
    "DELETE FROM llm_responses WHERE tenant = $1 AND id = $2",
    "DELETE FROM llm_responses WHERE expires_at <= $1"
);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(tenant: &str, id: &str, expires_at: i64) -> StoredResponse {
        StoredResponse {
            id: id.into(),
            tenant: tenant.into(),
            input: json!([{"role": "user", "content": "hi"}]),
            response: json!({"id": id, "object": "response", "output": [{"type": "message"}]})
                .to_string()
                .into(),
            created_at: 1,
            expires_at,
        }
    }

    /// The contract every store keeps: tenant scoping, expiry, replace, delete, purge.
    async fn contract(store: &dyn ResponseStore, prefix: &str) {
        let a = format!("{prefix}-a");
        let b = format!("{prefix}-b");
        store.put_response(row(&a, "resp_1", 100)).await.unwrap();
        let got = store.get_response(&a, "resp_1", 50).await.unwrap().unwrap();
        assert_eq!(got, row(&a, "resp_1", 100));
        // Another tenant sees nothing and deletes nothing.
        assert!(
            store
                .get_response(&b, "resp_1", 50)
                .await
                .unwrap()
                .is_none()
        );
        assert!(!store.delete_response(&b, "resp_1").await.unwrap());
        // The same id under another tenant is another row.
        store.put_response(row(&b, "resp_1", 100)).await.unwrap();
        assert!(
            store
                .get_response(&a, "resp_1", 50)
                .await
                .unwrap()
                .is_some()
        );
        // Replaced in place.
        store.put_response(row(&a, "resp_1", 200)).await.unwrap();
        let got = store
            .get_response(&a, "resp_1", 150)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.expires_at, 200);
        // Expired: not found, then purged.
        assert!(
            store
                .get_response(&b, "resp_1", 100)
                .await
                .unwrap()
                .is_none()
        );
        assert!(store.purge_expired_responses(100).await.unwrap() >= 1);
        assert!(store.get_response(&b, "resp_1", 0).await.unwrap().is_none());
        assert!(store.get_response(&a, "resp_1", 0).await.unwrap().is_some());
        assert!(store.delete_response(&a, "resp_1").await.unwrap());
        assert!(store.get_response(&a, "resp_1", 0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn sqlite_keeps_the_response_contract() {
        let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
        contract(&store, "t").await;
    }

    #[tokio::test]
    #[ignore = "needs DATABASE_URL pointing at PostgreSQL"]
    async fn postgres_keeps_the_response_contract() {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            panic!("DATABASE_URL is not set");
        };
        let store = PostgresStore::connect(&url).await.unwrap();
        // Tenants unique to this run: the database is shared with other tests.
        let prefix = format!("responses-{}", uuid::Uuid::new_v4());
        contract(&store, &prefix).await;
    }
}
