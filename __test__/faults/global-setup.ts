import { rmSync } from 'node:fs'
import { FIGURES_FILE } from '../support/faults'
import globalSetup from '../support/global-setup'

// Each run starts a fresh .tmp/faults.json, then brings up the same servers as `npm test`.
export default async function faultsGlobalSetup(): Promise<void> {
  rmSync(FIGURES_FILE, { force: true })
  await globalSetup()
}
