//! No store: caching is off (`CACHE_BACKEND=none`, `CACHE_ENABLED=false`). Cached functions run
//! before any of this is asked; a handle reads nothing and writes nowhere.

use std::time::Duration;

use super::protocol::{Acquired, FillOutcome, LeaseAsk, Renewal};
use super::store::Store;
use crate::error::BackendError;

pub(crate) struct NoStore;

impl Store for NoStore {
    fn kind(&self) -> &'static str {
        "none"
    }
    fn keeps_generations_in_process(&self) -> bool {
        true
    }
    async fn get_with<T>(&self, _: u8, _: &str, _: impl Fn(&[u8]) -> T) -> Result<Option<T>, BackendError> {
        Ok(None)
    }
    async fn get_with_generation<T>(
        &self,
        _: u8,
        _: &str,
        _: &str,
        _: Duration,
        _: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        Ok((None, None))
    }
    async fn get_many_with<T>(
        &self,
        _: u8,
        keys: &[String],
        _: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        Ok(keys.iter().map(|_| None).collect())
    }
    async fn set(&self, _: u8, _: &str, _: &[u8], _: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    async fn delete(&self, _: u8, _: &str) -> Result<bool, BackendError> {
        Ok(false)
    }
    async fn set_many(&self, _: u8, _: &[(String, Vec<u8>)], _: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    async fn delete_many(&self, _: u8, _: &[String]) -> Result<u64, BackendError> {
        Ok(0)
    }
    async fn exists(&self, _: u8, _: &str) -> Result<bool, BackendError> {
        Ok(false)
    }
    async fn expire(&self, _: u8, _: &str, _: Duration) -> Result<bool, BackendError> {
        Ok(false)
    }
    async fn ttl(&self, _: u8, _: &str) -> Result<Option<Duration>, BackendError> {
        Ok(None)
    }
    async fn clear(&self, _: u8, _: &str) -> Result<u64, BackendError> {
        Ok(0)
    }
    async fn ping(&self, _: u8) -> Result<(), BackendError> {
        Ok(())
    }
    async fn acquire<T>(
        &self,
        _: u8,
        _: &str,
        _: LeaseAsk,
        _: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        // Never asked: a runtime without a store runs functions before any lookup.
        Err(BackendError::Bypassed)
    }
    async fn renew(&self, _: u8, _: &str, _: u64, _: u64, _: Duration) -> Result<Renewal, BackendError> {
        Ok(Renewal::Lost)
    }
    async fn fill(
        &self,
        _: u8,
        _: &str,
        _: (u64, u64),
        _: &[u8],
        _: Duration,
    ) -> Result<FillOutcome, BackendError> {
        Ok(FillOutcome::Superseded)
    }
    async fn release(&self, _: u8, _: &str, _: u64) -> Result<(), BackendError> {
        Ok(())
    }
    async fn invalidate(&self, _: u8, _: &str, _: Duration) -> Result<(), BackendError> {
        Ok(())
    }
    async fn bump_generation(&self, _: u8, _: &str, _: Duration) -> Result<Option<u64>, BackendError> {
        Ok(None)
    }
}
