// The pool's core behaviour, without Node: SQLite needs no server.
use std::time::{Duration, Instant};

use quartermaster::error::ErrorCode;
use quartermaster::metrics::Registry;
use quartermaster::pool::{Bounds, Pool, PoolConfig, PoolOptions, Statement, Value};

fn pool(max_size: f64, acquire_timeout_ms: f64, max_waiting: Option<f64>) -> Pool {
    let config = PoolConfig::from_options(PoolOptions {
        url: "sqlite::memory:".into(),
        max_size: Some(max_size),
        acquire_timeout_ms: Some(acquire_timeout_ms),
        max_waiting,
        ..Default::default()
    })
    .unwrap();
    Pool::new(config, Registry::new(), tokio::runtime::Handle::current()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_times_out_in_the_wait_phase_when_every_connection_is_held() {
    let pool = pool(1.0, 50.0, None);
    let held = pool.acquire(None).await.unwrap();
    let started = Instant::now();
    let err = pool.acquire(None).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::PoolTimeout);
    assert_eq!(err.phase.map(|p| p.as_str()), Some("wait"));
    assert!(started.elapsed() < Duration::from_millis(500));
    drop(held);
    assert!(pool.acquire(None).await.is_ok());
    assert_eq!(pool.metrics().timeouts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wait_queue_refuses_at_once() {
    let pool = pool(1.0, 2000.0, Some(0.0));
    let _held = pool.acquire(None).await.unwrap();
    let started = Instant::now();
    let err = pool.acquire(None).await.err().unwrap();
    assert_eq!(err.code, ErrorCode::PoolExhausted);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_in_a_transaction_is_rolled_back_before_reuse() {
    let pool = pool(1.0, 2000.0, None);
    pool.execute("create table t(x integer)", &[])
        .await
        .unwrap();
    let mut lease = pool.acquire(None).await.unwrap();
    lease
        .connection()
        .unwrap()
        .execute("begin", &[])
        .await
        .unwrap();
    lease
        .connection()
        .unwrap()
        .execute("insert into t values (?1)", &[Value::Int(1)])
        .await
        .unwrap();
    lease.release();
    let rows = pool
        .query("select count(*) as n from t", &[])
        .await
        .unwrap();
    assert_eq!(rows.rows[0][0], Value::Int(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_statements_are_all_answered_and_close_refuses_new_work() {
    let pool = pool(2.0, 5000.0, None);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..200 {
        let tx = tx.clone();
        pool.submit(
            Statement::Query("select ?1 as i".into(), vec![Value::Int(i)]),
            Bounds::default(),
            Box::new(move |out| {
                let _ = tx.send((i, out));
            }),
        );
    }
    drop(tx);
    let mut answered = 0;
    while let Some((i, out)) = rx.recv().await {
        assert_eq!(out.unwrap().into_rows().rows[0][0], Value::Int(i));
        answered += 1;
    }
    assert_eq!(answered, 200);
    assert_eq!(pool.metrics().successful_gets, 200);
    pool.close(Duration::from_secs(1)).await.unwrap();
    let err = pool.query("select 1", &[]).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PoolClosed);
}
