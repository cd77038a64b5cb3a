//! `GET /v1/jobs/ws` through the gateway, with a real WebSocket client: the client key's
//! tenant scopes the subscriptions, as on the rest of the jobs API; a socket without a key
//! is refused before the upgrade.

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, GLOBEX_KEY, TestGateway, base_config, chat};
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(gw: &TestGateway, key: Option<&str>) -> Result<Ws, WsError> {
    let url = gw.url("/v1/jobs/ws").replacen("http://", "ws://", 1);
    let mut req = url.into_client_request().unwrap();
    if let Some(k) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

async fn next(ws: &mut Ws) -> Value {
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), wait)
        .await
        .expect("a message within 30 s")
}

#[tokio::test]
async fn a_client_key_follows_its_jobs_to_the_result_and_no_other() {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    openai.set_default(Scenario::ok().text("pushed answer"));
    let gw = TestGateway::start(&base_config(
        &openai.base_url(),
        &anthropic.base_url(),
        true,
        "",
    ))
    .await;
    let r = Client::with_key(ACME_KEY)
        .post(
            &gw.url("/v1/jobs"),
            &[],
            &chat("gpt-4o-mini", "Long task", false),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();

    // No key: refused with 401 before any upgrade.
    match connect(&gw, None).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), StatusCode::UNAUTHORIZED),
        other => panic!("expected a 401, got {:?}", other.map(|_| ())),
    }

    // Another tenant's key: the job does not exist for it.
    let mut theirs = connect(&gw, Some(GLOBEX_KEY)).await.unwrap();
    theirs
        .send(Message::text(
            json!({"type": "subscribe", "ids": [id]}).to_string(),
        ))
        .await
        .unwrap();
    let m = next(&mut theirs).await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["error"]["code"], "not_found");

    // The owner gets the final state with the result.
    let mut ws = connect(&gw, Some(ACME_KEY)).await.unwrap();
    ws.send(Message::text(
        json!({"type": "subscribe", "ids": [id]}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    let fin = loop {
        let m = next(&mut ws).await;
        if m["type"] == "final" {
            break m;
        }
        assert_eq!(m["type"], "job", "{m}");
    };
    assert_eq!(fin["job"]["status"], "succeeded");
    assert_eq!(
        fin["job"]["result"]["choices"][0]["message"]["content"],
        "pushed answer"
    );
}
