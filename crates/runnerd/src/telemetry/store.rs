//! A `StateStore` that emits [`StoreCallFinished`] for every call, so that
//! DynamoDB's throttling is counted by operation as EC2's is.

use std::sync::Arc;

use async_trait::async_trait;
use runner_core::model::{EnvironmentId, Record};
use runner_core::traits::{StateStore, StoreError};

use super::Metrics;
use super::events::StoreCallFinished;

/// A `StateStore` that counts every call by operation and outcome.
pub struct InstrumentedStore {
    inner: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for InstrumentedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedStore").finish_non_exhaustive()
    }
}

impl InstrumentedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn StateStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn counted<T>(
        &self,
        operation: &'static str,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        StoreCallFinished {
            operation,
            error: result.as_ref().err(),
        }
        .emit(&self.metrics);
        result
    }
}

#[async_trait]
impl StateStore for InstrumentedStore {
    async fn list(&self) -> Result<Vec<Record>, StoreError> {
        self.counted("store_list", self.inner.list().await)
    }

    async fn get(&self, environment: EnvironmentId) -> Result<Option<Record>, StoreError> {
        self.counted("store_get", self.inner.get(environment).await)
    }

    async fn put(&self, record: &Record) -> Result<Record, StoreError> {
        self.counted("store_put", self.inner.put(record).await)
    }

    async fn delete(&self, record: &Record) -> Result<(), StoreError> {
        self.counted("store_delete", self.inner.delete(record).await)
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.counted("store_check", self.inner.check().await)
    }
}
