export default async function globalTeardown(): Promise<void> {
  const stops: Array<() => Promise<void>> = (globalThis as any).__qmStops ?? []
  await Promise.all(stops.map((stop) => stop()))
}
