// Turns the figures of the last `npm run test:faults` (.tmp/faults.json, one JSON line per
// scenario) into the table between the markers in RELIABILITY.md, with each scenario's verdict
// from jest's report when the run wrote one:
//   npm run test:faults -- --json --outputFile=.tmp/jest-faults.json; npm run faults:table
//   npm run faults:table -- --print   print the table only
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import path from 'node:path'

import type { Figures } from '../__test__/support/faults'

const ROOT = path.join(__dirname, '..')
const FIGURES = path.join(ROOT, '.tmp', 'faults.json')
const JEST = path.join(ROOT, '.tmp', 'jest-faults.json')
const NOTE = path.join(ROOT, 'RELIABILITY.md')
const BEGIN = '<!-- faults:begin -->'
const END = '<!-- faults:end -->'

/** One line of .tmp/faults.json: the scenario's figures as the suite reported them. */
interface Row extends Figures {
  test?: string
  short: boolean
  at: string
}

/** Test full name → 'pass' | 'FAIL', from jest's --json report of the same run. */
function verdicts(): Map<string, string> {
  const map = new Map<string, string>()
  if (!existsSync(JEST)) return map
  const report = JSON.parse(readFileSync(JEST, 'utf8'))
  for (const suite of report.testResults ?? []) {
    for (const a of suite.assertionResults ?? []) map.set(a.fullName, a.status === 'passed' ? 'pass' : 'FAIL')
  }
  return map
}

const ms = (v: number | null) => (v === null ? '—' : `${Math.round(v)} ms`)
const cell = (s: string) => s.replace(/\|/g, '\\|')

const rows: Row[] = readFileSync(FIGURES, 'utf8').trim().split('\n').filter(Boolean).map((l) => JSON.parse(l))
const verdict = verdicts()
const forms = new Set(rows.map((r) => (r.short ? 'short (QM_FAULTS_SHORT=1)' : 'full')))
const lines = [
  `Run of ${rows[0]?.at.slice(0, 10) ?? '—'}, ${[...forms].join(' + ')} form, ${rows.length} scenarios.`,
  '',
  '| scenario | backend | verdict | calls | errors by code | first success after recovery | max settle vs deadline | statements bounded by | notes |',
  '|---|---|---|--:|---|--:|---|---|---|',
  ...rows.map((r) => {
    const errors = Object.entries(r.errors).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'
    const settle = r.deadlineMs === null ? ms(r.maxSettleMs) : `${ms(r.maxSettleMs)} / ${ms(r.deadlineMs)}`
    const v = (r.test && verdict.get(r.test)) ?? '—'
    return `| ${cell(r.scenario)} | ${r.backend} | ${v === 'FAIL' ? '**FAIL**' : v} | ${r.calls} | ${cell(errors)} | ${ms(r.firstSuccessMs)} | ${settle} | ${cell(r.bound)} | ${cell(r.notes)} |`
  }),
]
const table = lines.join('\n')

if (process.argv.includes('--print')) {
  console.log(table)
} else {
  const note = readFileSync(NOTE, 'utf8')
  const start = note.indexOf(BEGIN)
  const end = note.indexOf(END)
  if (start < 0 || end < start) throw new Error(`RELIABILITY.md has no ${BEGIN} … ${END} markers`)
  writeFileSync(NOTE, note.slice(0, start + BEGIN.length) + '\n' + table + '\n' + note.slice(end))
  console.log(`RELIABILITY.md: ${rows.length} scenarios from ${FIGURES}`)
}
