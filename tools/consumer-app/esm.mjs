// ESM consumers get the named exports too (Node's CommonJS export detection sees through
// index.js to the generated binding.js).
import { ConnectionPool, Metrics, Model, ModelCache, PooledConnection } from 'quartermaster'

const missing = Object.entries({ ConnectionPool, Metrics, Model, ModelCache, PooledConnection }).filter(([, v]) => typeof v !== 'function')
if (missing.length > 0) {
  console.error(`ESM import: not functions: ${missing.map(([k]) => k).join(', ')}`)
  process.exit(1)
}
console.log('esm import OK')
