cache_runtime::cache_db!(pub Platform = 15, "platform");

fn main() {}
