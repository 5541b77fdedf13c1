/** The e2e app: App Router, no telemetry, nothing cached by Next itself. */
const config = {
  poweredByHeader: false,
};
export default config;
