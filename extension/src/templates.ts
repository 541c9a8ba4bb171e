/**
 * Code the sidebar writes into notebooks. Pure strings: tested without JupyterLab.
 */

/** Lens dashboards offered by the sidebar (see tpmlab.widgets.dashboard). */
export const LENSES = ['logit', 'tuned', 'attention'];

function pyString(s: string): string {
  return JSON.stringify(s); // a JSON string is a valid Python string literal
}

/**
 * A cell that connects to the engine, attaches to `model` and opens the `lens`
 * dashboard. `address`: the scheduler to connect to (`null`: the default engine).
 */
export function lensCell(
  model: string,
  lens = 'logit',
  address: string | null = null
): string {
  const connect =
    address && !address.startsWith('inproc://')
      ? `tpmlab.connect(${pyString(address)})`
      : 'tpmlab.connect()';
  return [
    'import tpmlab',
    'from tpmlab.widgets import dashboard',
    '',
    `lab = ${connect}`,
    `model = lab.model(${pyString(model)})`,
    `dashboard(model, ${pyString(lens)})`
  ].join('\n');
}
