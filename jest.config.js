/** @type {import('jest').Config} */
module.exports = {
  testEnvironment: 'node',
  testMatch: ['<rootDir>/__test__/**/*.spec.ts'],
  // The fault suite has its own run: `npm run test:faults` (jest.faults.config.js).
  testPathIgnorePatterns: ['/node_modules/', '<rootDir>/__test__/faults/'],
  transform: { '^.+\\.tsx?$': ['@swc/jest'] },
  globalSetup: '<rootDir>/__test__/support/global-setup.ts',
  globalTeardown: '<rootDir>/__test__/support/global-teardown.ts',
  testTimeout: 60_000,
}
