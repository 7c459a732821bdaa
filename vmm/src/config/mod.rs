//! Option values: a `key=value` deserializer ([`keyvalue`]) and the typed configurations
//! built with it ([`device`], [`tls`]).

pub mod device;
pub mod keyvalue;
pub mod tls;
