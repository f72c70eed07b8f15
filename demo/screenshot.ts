// Regenerates docs/demo.png: runs `npm run demo` in a detached tmux pane, captures the pane with
// its colours (`tmux capture-pane -e`), replays the capture into @xterm/headless, serializes it to
// HTML (@xterm/addon-serialize) and photographs that with headless Chromium.
//   npx tsx demo/screenshot.ts            (needs tmux and chromium: apt-get install tmux chromium)
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { SerializeAddon } from '@xterm/addon-serialize'
import { Terminal } from '@xterm/headless'

const ROOT = path.join(__dirname, '..')
const OUT = path.join(ROOT, 'docs', 'demo.png')
const COLS = 124
const ROWS = 40
const session = `qm-demo-shot-${process.pid}`

const tmux = (...args: string[]) => execFileSync('tmux', args, { encoding: 'utf8' })
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function capture(): Promise<string> {
  tmux('new-session', '-d', '-s', session, '-x', String(COLS), '-y', String(ROWS), '-c', ROOT, 'bash --norc --noprofile')
  try {
    tmux('send-keys', '-t', session, "PS1='$ '; clear", 'Enter')
    await sleep(300)
    tmux('send-keys', '-t', session, 'npm run --silent demo -- --duration 8', 'Enter')
    const deadline = Date.now() + 60_000
    // Done when the report is out and the shell prompt is back (the demo has cleaned up).
    const finished = (pane: string) => /metrics health[\s\S]*\n\$ *$/.test(pane.replace(/\s+$/, ''))
    while (!finished(tmux('capture-pane', '-p', '-t', session))) {
      if (Date.now() > deadline) throw new Error(`the demo did not finish in the tmux pane:\n${tmux('capture-pane', '-p', '-t', session)}`)
      await sleep(250)
    }
    return tmux('capture-pane', '-e', '-p', '-t', session)
  } finally {
    tmux('kill-session', '-t', session)
  }
}

function toHtml(ansi: string): Promise<{ html: string; rows: number }> {
  const lines = ansi.replace(/\s+$/, '').split('\n')
  while (lines.length && lines[lines.length - 1].trim() === '$') lines.pop()
  const term = new Terminal({ cols: COLS, rows: lines.length, allowProposedApi: true, convertEol: true })
  const serializer = new SerializeAddon()
  term.loadAddon(serializer as never)
  return new Promise<{ html: string; rows: number }>((resolve) => {
    term.write(lines.join('\n'), () => {
      const fragment = serializer
        .serializeAsHTML({ includeGlobalBackground: true })
        .replace(/font-family: [^;]+; font-size: \d+px;/, 'font-family: "DejaVu Sans Mono", monospace; font-size: 14px; line-height: 18px;')
        .replace(/background-color: #000000/, 'background-color: #1e1e1e')
      resolve({
        html: `<!doctype html><meta charset="utf-8"><style>html,body{margin:0;background:#1e1e1e}pre{margin:0;padding:16px 18px}</style>${fragment}`,
        rows: lines.length,
      })
    })
  })
}

async function main(): Promise<void> {
  const ansi = await capture()
  const { html, rows } = await toHtml(ansi)
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'qm-demo-shot-'))
  try {
    const file = path.join(tmp, 'demo.html')
    writeFileSync(file, html)
    const width = Math.ceil(COLS * 8.43 + 36)
    const height = rows * 18 + 32
    execFileSync(
      'chromium',
      ['--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', `--window-size=${width},${height}`, `--screenshot=${OUT}`, `file://${file}`],
      { stdio: 'ignore' },
    )
    console.log(`wrote ${path.relative(ROOT, OUT)} (${width}×${height}, ${rows} terminal rows)`)
  } finally {
    rmSync(tmp, { recursive: true, force: true })
  }
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
