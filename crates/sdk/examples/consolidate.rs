//! Consolidates one document and asks about it before and after:
//! `cargo run -p engram-sdk --example consolidate -- --coordinator http://127.0.0.1:7300 --replica http://127.0.0.1:7310`
//! (start a cluster with `engram up` first).

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:7300")]
    coordinator: String,
    #[arg(long, default_value = "http://127.0.0.1:7310")]
    replica: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(
        long,
        default_value = "<doc> Golhal Kineldley was born in Oskruswick . Golhal Kineldley works for Bryquocorp . Golhal Kineldley has a pet eldmavet . </doc>"
    )]
    document: String,
    #[arg(long, default_value = "where does Golhal Kineldley work ?")]
    question: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = engram_sdk::Client::connect(&a.coordinator).await?;
    let replicas = engram_sdk::Replicas::connect(std::slice::from_ref(&a.replica)).await?;
    let prompt = format!("Q : {} A :", a.question);
    let before = replicas.generate(&a.namespace, &prompt, 8).await?;
    println!("before: {} (version {:?})", before.text, before.version);
    let job =
        client.consolidate(&a.namespace, vec![a.document.clone()], &format!("example-{}", a.document.len())).await?;
    let done = client.watch(&job.id, |j| println!("job {}: {:?}", j.id, j.state())).await?;
    println!("job {} ended {:?} with version {}", done.id, done.state(), done.version);
    let after = replicas.generate(&a.namespace, &prompt, 8).await?;
    println!("after: {} (version {:?})", after.text, after.version);
    Ok(())
}
