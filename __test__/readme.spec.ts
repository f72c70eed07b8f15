import { readFileSync } from 'node:fs'
import path from 'node:path'

// The README's first TypeScript example is examples/quickstart.ts, which `tsc --noEmit` checks.
it('README quick start is the type-checked examples/quickstart.ts', () => {
  const root = path.join(__dirname, '..')
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8')
  const block = readme.match(/```ts\n([\s\S]*?)```/)
  expect(block).not.toBeNull()
  expect(block![1]).toBe(readFileSync(path.join(root, 'examples/quickstart.ts'), 'utf8'))
})

it('README bounded-work and streams example is the type-checked examples/bounded-and-streams.ts', () => {
  const root = path.join(__dirname, '..')
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8')
  const example = readFileSync(path.join(root, 'examples/bounded-and-streams.ts'), 'utf8')
  expect(readme).toContain('```ts\n' + example + '```')
})

it('README scaling-out example is part of the type-checked examples/scaling.ts', () => {
  const root = path.join(__dirname, '..')
  const readme = readFileSync(path.join(root, 'README.md'), 'utf8')
  const section = readme.slice(readme.indexOf('## Scaling out'))
  const block = section.match(/```ts\n([\s\S]*?)```/)
  expect(block).not.toBeNull()
  expect(readFileSync(path.join(root, 'examples/scaling.ts'), 'utf8')).toContain(block![1])
})
