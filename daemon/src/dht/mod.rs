//! The DHT's local side: the store a node keeps for the swarm. The distributed operations
//! (store on the closest replicas, get and merge) are methods of
//! [`NodeHandle`](crate::handle::NodeHandle).

pub mod store;
