import { soak } from '../benchmark/models-soak'

// Short form of `npm run soak:models` (QM_SOAK_CYCLES sets the length; CI keeps the default).
describe('ModelCache soak (short)', () => {
  it('returns every native byte after load/evict cycles and predictions', async () => {
    const cycles = Number(process.env.QM_SOAK_CYCLES ?? 1000)
    const r = await soak(cycles, cycles * 10)
    console.log(
      `models soak: ${r.cycles} cycles, ${r.predicts} predicts, cache bytes ${r.cacheBytesEnd}, ` +
        `RSS drift ${r.rssDriftMb.toFixed(2)} MiB after warm-up (${r.seconds.toFixed(1)} s)`,
    )
    expect(r.cacheBytesEnd).toBe(0)
    expect(r.modelBytesEnd).toBe(0)
    // Jest's own allocations add noise; the 5 MiB bound is checked by the standalone soak.
    expect(r.rssDriftMb).toBeLessThan(32)
  })
})
