//! `onDelete: Delete` row removal against the real DynamoDB Local: more rows than one
//! BatchWriteItem takes, other groups untouched, idempotent. Skips with a message without
//! `AWS_ENDPOINT_URL_DYNAMODB`; fails when it is set but unreachable.

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use kcg_operator::store_admin::delete_group;
use kcg_worker::store::{StateStore, now_ms};

#[tokio::test]
async fn deletes_every_row_of_one_group_in_batches() {
    let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL_DYNAMODB") else {
        eprintln!(
            "SKIP: AWS_ENDPOINT_URL_DYNAMODB is not set; start DynamoDB Local (scripts/emulators.sh start dynamodb)"
        );
        return;
    };
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&conf);
    let table = format!("kcg-store-admin-{}", std::process::id());
    let store = StateStore::new(client.clone(), table.clone());
    store
        .ensure_table(true)
        .await
        .expect("DynamoDB Local is configured but unusable");

    for i in 0..60 {
        store
            .register("ns/doomed", &format!("c-{i:03}"), "pod", now_ms(), &[])
            .await
            .unwrap();
    }
    for i in 0..3 {
        store
            .create_lease("ns/doomed", "s", &format!("shardId-{i}"))
            .await
            .unwrap();
    }
    store
        .register("ns/kept", "k-1", "pod", now_ms(), &[])
        .await
        .unwrap();

    let deleted = delete_group(&client, &table, "ns/doomed").await.unwrap();
    assert_eq!(
        deleted, 123,
        "60 client rows, their 60 stream lists and 3 leases, over five batches of 25"
    );
    let snap = store.load_group("ns/doomed").await.unwrap();
    assert!(snap.clients.is_empty() && snap.leases.is_empty());
    assert!(
        store
            .load_client_streams("ns/doomed", "c-000")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.load_group("ns/kept").await.unwrap().clients.len(), 1);
    assert_eq!(
        delete_group(&client, &table, "ns/doomed").await.unwrap(),
        0,
        "idempotent"
    );
    assert_eq!(
        delete_group(&client, "kcg-no-such-table-x", "ns/doomed")
            .await
            .unwrap(),
        0,
        "no table, no rows"
    );
}
