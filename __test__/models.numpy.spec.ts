// Live NumPy cross-check of the CPU forward pass. __test__/models.spec.ts compares against NumPy
// outputs committed as a fixture, so `npm test` needs no Python; this suite runs NumPy now:
// on models exported by tools/export_safetensors.py (NumPy's own PRNG, so other weights than
// the fixture's) with tools/reference_numpy.py, and it checks that the committed fixture is
// still what tools/model_fixtures.py computes. It needs `python3 -c 'import numpy'` to work
// (`pip install -r tools/requirements.txt`, which .ci/run does): without numpy it skips with a
// loud notice, and under CI=true it fails instead.
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { closeness, exportLstm, exportMlp, randomInput, reference, ROOT } from '../benchmark/models-support'
import { ModelCache } from '../index'

const probe = spawnSync('python3', ['-c', 'import numpy; print(numpy.__version__)'], { encoding: 'utf8' })
const numpy = probe.status === 0 ? probe.stdout.trim() : null
const inCi = process.env.CI === 'true'
const install = 'pip install -r tools/requirements.txt'

if (!numpy) {
  const why = probe.error ? probe.error.message : (probe.stderr ?? '').trim().split('\n').pop()
  if (inCi) {
    describe('NumPy live cross-check', () => {
      it('runs under CI', () => {
        throw new Error(`CI: python3 cannot import numpy (${why}); ${install}`)
      })
    })
  } else {
    // Straight to stderr: jest prints no console output for a suite whose tests all skipped.
    const banner = '*'.repeat(78)
    process.stderr.write(
      `\n${banner}\n*** NumPy live cross-check SKIPPED (__test__/models.numpy.spec.ts): python3 cannot import numpy\n` +
        `*** (${why}). The model tests still ran against the committed NumPy fixture.\n*** For the live check: ${install}\n${banner}\n`,
    )
  }
}

const numpyDescribe = numpy ? describe : describe.skip

numpyDescribe(`ModelCache: CPU inference matches NumPy ${numpy ?? ''} live, to 1e-5`, () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qm-models-numpy-'))
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }))
  const at = (name: string) => path.join(tmp, `${name}.safetensors`)
  const cpu = () => new ModelCache({ device: 'cpu', cleanupIntervalMs: 0 })

  const cases: Array<[string, () => string]> = [
    ['MLP 64→256→256→1 relu', () => exportMlp(at('bench-mlp'), 1, [64, 256, 256, 1], ['relu', 'relu', 'none'])],
    ['MLP with gelu/tanh/sigmoid', () => exportMlp(at('acts-mlp'), 2, [16, 32, 32, 8, 4], ['gelu', 'tanh', 'sigmoid', 'none'])],
    ['LSTM 2 layers + 2-layer head', () => exportLstm(at('lstm2'), 3, 5, 16, 2, 12, [8, 3], ['relu', 'none'])],
    ['LSTM 3 layers, no dense head', () => exportLstm(at('lstm3'), 4, 3, 8, 3, 6, [], [])],
    ['sample-mlp', () => path.join(ROOT, 'models/sample-mlp.safetensors')],
    ['sample-lstm', () => path.join(ROOT, 'models/sample-lstm.safetensors')],
  ]
  it.each(cases)('%s at batch 1 and 64', async (_name, make) => {
    const file = make()
    const model = await cpu().load('m', file)
    for (const batch of [1, 64]) {
      const x = randomInput(batch * model.inputSize * model.sequenceLength, batch)
      const want = reference(file, x, batch, tmp)
      const worst = closeness(await model.predict(x, { batch }), want)
      closeness(model.predictSync(x), want)
      expect(worst).toBeLessThanOrEqual(1)
    }
    model.release()
  })

  it('the committed fixture (__test__/fixtures/model-reference.json) is what tools/model_fixtures.py computes now', () => {
    const r = spawnSync('python3', [path.join(ROOT, 'tools/model_fixtures.py'), '--check'], { cwd: path.join(ROOT, 'tools'), encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`tools/model_fixtures.py --check failed:\n${r.stderr}${r.stdout}`)
    console.log(r.stdout.trim())
  })
})
