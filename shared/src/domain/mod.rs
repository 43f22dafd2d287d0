//! The types both layers share: what a connection, a pending authorization or a revocation
//! is, the `Secret` every credential lives in, and the arithmetic of rate-limit windows.

pub mod model;
pub mod rate_limit;
pub mod secret;
