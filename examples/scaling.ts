import { ConnectionPool } from 'quartermaster'

// Writes: every host listed; only the primary is accepted, so a failover is followed.
const writes = new ConnectionPool({ url: 'postgres://app@db1,db2,db3/trading?target_session_attrs=read-write', name: 'writes' })
// Reads: spread over the standbys (libpq's load_balance_hosts; prefer-standby falls back to the primary).
const reads = new ConnectionPool({ url: 'postgres://app@db2,db3/trading?target_session_attrs=read-only&load_balance_hosts=random', name: 'reads' })
reads.status().hosts // [{ host: 'db2:5432', connections: 4 }, { host: 'db3:5432', connections: 4 }]
// Behind PgBouncer in transaction mode (1.18): no named statements.
const bounced = new ConnectionPool({ url: 'postgres://app@pgbouncer:6432/trading', statementCache: false })
// Redis Cluster: seed nodes; keys routed by slot.
const cache = new ConnectionPool({ url: 'redis://r1:7000,r2:7000,r3:7000', cluster: true })

export { writes, reads, bounced, cache }
