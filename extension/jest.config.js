// Unit tests for the sidebar's logic (polling, backoff, status -> view model).
// These modules import nothing from JupyterLab, so plain ts-jest is enough.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/src'],
  testRegex: '/__tests__/.*\\.spec\\.ts$',
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  }
};
