// Large futures cost a memcpy on every move (spawn, boxing). Keep the hot ones small.
use quartermaster::metrics::Registry;
use quartermaster::pool::{Pool, PoolConfig, PoolOptions, Value};

#[tokio::test]
async fn hot_path_futures_stay_small() {
    let config = PoolConfig::from_options(PoolOptions {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .unwrap();
    let pool = Pool::new(config, Registry::new(), tokio::runtime::Handle::current()).unwrap();
    let params: Vec<Value> = Vec::new();
    let query = pool.query("select 1", &params);
    let acquire = pool.acquire(None);
    println!(
        "query future: {} bytes, acquire future: {} bytes",
        std::mem::size_of_val(&query),
        std::mem::size_of_val(&acquire)
    );
    assert!(
        std::mem::size_of_val(&query) <= 2048,
        "pool.query future is {} bytes",
        std::mem::size_of_val(&query)
    );
}
