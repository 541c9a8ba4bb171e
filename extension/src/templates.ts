/**
 * Code the sidebar writes into notebooks, and its lens menu. Pure data: tested without
 * JupyterLab.
 */

/** A lens as GET /tpmlab/api/lenses lists it (docs/rest-api.md). */
export interface ILensJSON {
  name: string;
  title: string;
  description: string;
  inputs: string;
}

/** The answer of GET /tpmlab/api/lenses: the lenses keeping the lens contract, and the
 * error of each plugin that does not. */
export interface ILensesJSON {
  lenses: ILensJSON[];
  errors: { [name: string]: string };
}

/** One entry of the sidebar's lens menu. */
export interface ILensChoice {
  value: string;
  label: string;
  title: string;
}

/** Chosen when the menu first fills, if the server offers it. */
export const PREFERRED_LENS = 'logit';

/**
 * The sidebar's lens menu from the server's list (in its order): each lens by its title,
 * its description as the tooltip. `selected` keeps `current` when it is still offered,
 * else the preferred lens, else the first; `null` when there is none.
 */
export function lensMenu(
  lenses: ILensJSON[],
  current: string | null = null
): { choices: ILensChoice[]; selected: string | null } {
  const choices = lenses.map(l => ({
    value: l.name,
    label: l.title || l.name,
    title: l.description || l.name
  }));
  const names = choices.map(c => c.value);
  const selected =
    current !== null && names.includes(current)
      ? current
      : names.includes(PREFERRED_LENS)
        ? PREFERRED_LENS
        : names.length
          ? names[0]
          : null;
  return { choices, selected };
}

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
