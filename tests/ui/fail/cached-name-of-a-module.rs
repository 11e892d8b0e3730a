use cache_runtime::cached;
use cache_runtime::db::MarketData;

// A module named like the function beside it: `#[cached]` adds a hidden struct of the function's
// name (the type namespace, where modules live too), so rustc says the name is defined twice.
// README says so: rename one of them.
mod user {
    pub const TABLE: &str = "users";
}

#[cached(db = MarketData, prefix = "users", ttl = 60)]
async fn user(id: u64) -> String {
    format!("{}:{id}", user::TABLE)
}

fn main() {}
