/** @type {import('jest').Config} */
// `npm run test:faults`: the fault suite (__test__/faults), outside the default `npm test`.
// QM_FAULTS_SHORT=1 is CI's short form of every scenario.
module.exports = {
  ...require('./jest.config'),
  testMatch: ['<rootDir>/__test__/faults/**/*.spec.ts'],
  testPathIgnorePatterns: ['/node_modules/'],
  globalSetup: '<rootDir>/__test__/faults/global-setup.ts',
  testTimeout: 180_000,
}
