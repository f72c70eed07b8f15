// benchmark/results.svg: quartermaster ÷ each peer for every headline comparison, drawn by
// vega-lite (compiled to a vega spec, rendered to SVG headless in Node — no canvas needed).
import type { TopLevelSpec } from 'vega-lite' with { 'resolution-mode': 'import' }

export interface Ratio {
  /** The comparison, e.g. `pool.query · 10k concurrent select 1, pool 4`. */
  comparison: string
  peer: string
  /** quartermaster ÷ peer in the comparison's "higher is better" unit. */
  ratio: number
}

export async function chartSvg(ratios: Ratio[], subtitle: string): Promise<string> {
  // Both are ESM-only; this file is CommonJS.
  const vl = await import('vega-lite')
  const vega = await import('vega')
  // One row per bar: "comparison · vs peer", in the order given.
  const values = ratios.map((r) => ({ ...r, row: `${r.comparison} · vs ${r.peer}`, label: `${r.ratio.toFixed(2)}×` }))
  const rows = values.map((v) => v.row)
  const min = Math.min(0.5, ...ratios.map((r) => r.ratio)) / 3
  const max = Math.max(2, ...ratios.map((r) => r.ratio)) * 2
  const x = {
    field: 'ratio',
    type: 'quantitative' as const,
    scale: { type: 'log' as const, domain: [min, max], nice: false },
    axis: { grid: true, values: [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100].filter((v) => v >= min && v <= max), format: '~g', labelExpr: "datum.label + '×'" },
    title: 'quartermaster ÷ peer (log scale; right of 1× favours quartermaster)',
  }
  const y = { field: 'row', type: 'nominal' as const, sort: rows, title: null, axis: { labelLimit: 1000, labelFontSize: 11 } }
  const spec: TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: 'quartermaster against each peer, same process run', subtitle, anchor: 'start', fontSize: 15 },
    width: 480,
    height: { step: 20 },
    background: 'white',
    padding: 12,
    data: { values },
    layer: [
      {
        mark: { type: 'bar', height: { band: 0.75 } },
        encoding: {
          y,
          x,
          x2: { datum: 1 },
          color: { field: 'peer', type: 'nominal', title: 'peer', scale: { scheme: 'tableau10' }, legend: { orient: 'bottom', columns: 3 } },
        },
      },
      // Ratio labels outside the bar end: right of wins, left of losses.
      {
        transform: [{ filter: 'datum.ratio >= 1' }],
        mark: { type: 'text', align: 'left', dx: 4, fontSize: 10 },
        encoding: { y, x, text: { field: 'label' } },
      },
      {
        transform: [{ filter: 'datum.ratio < 1' }],
        mark: { type: 'text', align: 'right', dx: -4, fontSize: 10 },
        encoding: { y, x, text: { field: 'label' } },
      },
      {
        data: { values: [{ one: 1 }] },
        mark: { type: 'rule', strokeDash: [4, 3], color: '#333' },
        encoding: { x: { field: 'one', type: 'quantitative' } },
      },
    ],
    config: { font: 'Helvetica, Arial, sans-serif', view: { stroke: null }, axis: { labelLimit: 1000 } },
  }
  const compiled = vl.compile(spec).spec
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' })
  const svg = await view.toSVG()
  view.finalize()
  return svg
}
