//! Node agent (identity, capacity, deployments, networking, VM supervision): later issues.
