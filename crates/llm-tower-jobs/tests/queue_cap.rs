//! `JobStore::count_queued`, on both stores (PostgreSQL when DATABASE_URL is set, ignored
//! otherwise): what the HTTP endpoint's per-tenant queue cap counts.

mod common;

use std::sync::Arc;

use llm_tower_core::{ChatRequest, Message, Tenant};
use llm_tower_jobs::{JobOptions, JobStore, Jobs};

async fn queued_jobs_are_counted_per_tenant_up_to_the_limit(store: Arc<dyn JobStore>) {
    let jobs = Jobs::new(store.clone());
    let acme = Tenant::from("acme");
    let mut ids = Vec::new();
    for i in 0..5 {
        let req = ChatRequest::new("m", vec![Message::user(format!("q{i}"))]);
        ids.push(
            jobs.submit_chat(&acme, req, JobOptions::default())
                .await
                .unwrap()
                .job
                .id,
        );
    }
    let req = ChatRequest::new("m", vec![Message::user("other tenant")]);
    jobs.submit_chat(&Tenant::from("globex"), req, JobOptions::default())
        .await
        .unwrap();
    assert_eq!(store.count_queued("acme", 100).await.unwrap(), 5);
    // The count stops at the limit.
    assert_eq!(store.count_queued("acme", 3).await.unwrap(), 3);
    assert_eq!(store.count_queued("globex", 100).await.unwrap(), 1);
    assert_eq!(store.count_queued("nobody", 100).await.unwrap(), 0);
    // A cancelled job is no longer queued.
    jobs.cancel(&acme, ids[0]).await.unwrap();
    assert_eq!(store.count_queued("acme", 100).await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_counts_queued_jobs() {
    let db = common::TempDb::new();
    queued_jobs_are_counted_per_tenant_up_to_the_limit(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn postgres_counts_queued_jobs() {
    let schema = common::unique("jobs_test");
    queued_jobs_are_counted_per_tenant_up_to_the_limit(common::postgres_in(&schema).await).await;
    common::drop_schema(&schema).await;
}
