//! AWS adapters for the runner's core traits: the DynamoDB state store and
//! leader lease, EC2 compute, Secrets Manager and KMS, and ECS self-update.
//!
//! Adapters translate; they never decide policy. This crate is still empty:
//! the adapters land with the AWS work.
