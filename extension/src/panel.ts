/** The tpmlab sidebar: cluster, workers, deployed models, requests, usage. */
import { Widget } from '@lumino/widgets';

import { IViewModel, Tone } from './view';
import { ILensJSON, lensMenu } from './templates';

export interface ISidebarActions {
  refresh(): void;
  openDashboard(url: string): void;
  deploy(name: string, stages: number): Promise<void>;
  undeploy(name: string): Promise<void>;
  openLens(model: string, lens: string, newNotebook: boolean): Promise<void>;
}

type Child = Node | string | null | undefined | false;

function h(
  tag: string,
  attrs: Record<string, string> = {},
  ...children: (Child | Child[])[]
): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) {
      continue;
    }
    el.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return el;
}

function badge(text: string, tone: Tone): HTMLElement {
  return h('span', { class: `jp-tpmlab-badge jp-tpmlab-tone-${tone}` }, text);
}

function button(
  label: string,
  title: string,
  onClick: () => void,
  extra = ''
): HTMLButtonElement {
  const b = h(
    'button',
    { class: `jp-tpmlab-button ${extra}`.trim(), title, type: 'button' },
    label
  ) as HTMLButtonElement;
  b.addEventListener('click', onClick);
  return b;
}

function section(title: string, ...body: (Child | Child[])[]): HTMLElement {
  return h(
    'section',
    { class: 'jp-tpmlab-section' },
    h('header', { class: 'jp-tpmlab-section-header' }, title),
    ...body
  );
}

function table(head: string[], rows: Child[][], cls = ''): HTMLElement {
  return h(
    'table',
    { class: `jp-tpmlab-table ${cls}`.trim() },
    h('thead', {}, h('tr', {}, head.map(x => h('th', {}, x)))),
    h(
      'tbody',
      {},
      rows.map(r => h('tr', {}, r.map(c => h('td', {}, c))))
    )
  );
}

function meter(fraction: number | null): HTMLElement | null {
  if (fraction === null) {
    return null;
  }
  const pct = Math.round(fraction * 100);
  const bar = h('div', { class: 'jp-tpmlab-meter-fill' });
  bar.style.width = `${pct}%`;
  if (fraction > 0.9) {
    bar.classList.add('jp-tpmlab-tone-error');
  } else if (fraction > 0.7) {
    bar.classList.add('jp-tpmlab-tone-warn');
  }
  return h('div', { class: 'jp-tpmlab-meter', title: `${pct}%` }, bar);
}

export class TpmlabSidebar extends Widget {
  constructor(private readonly actions: ISidebarActions) {
    super();
    this.id = 'tpmlab-sidebar';
    this.addClass('jp-tpmlab-Sidebar');
    this.title.caption = 'tpmlab: cluster and models';

    this._dashboardButton = button(
      'Dask dashboard',
      'Open the Dask dashboard in a new tab',
      () => this._dashboardUrl && this.actions.openDashboard(this._dashboardUrl),
      'jp-tpmlab-dashboard-link'
    );
    this._dashboardButton.disabled = true;
    const header = h(
      'div',
      { class: 'jp-tpmlab-header' },
      h('span', { class: 'jp-tpmlab-title' }, 'tpmlab'),
      h(
        'span',
        { class: 'jp-tpmlab-header-actions' },
        this._dashboardButton,
        button('↻', 'Refresh now', () => this.actions.refresh(), 'jp-tpmlab-icon-button')
      )
    );

    // Filled from the server's lens registry (setLenses): no lens is named here.
    this._lens = h('select', {
      class: 'jp-tpmlab-select jp-tpmlab-lens-select',
      title: 'Lens dashboard to open'
    }) as HTMLSelectElement;

    this._modelName = h('input', {
      class: 'jp-tpmlab-input jp-tpmlab-deploy-name',
      list: 'jp-tpmlab-available',
      placeholder: 'model to deploy',
      'aria-label': 'model to deploy'
    }) as HTMLInputElement;
    this._available = h('datalist', { id: 'jp-tpmlab-available' }) as HTMLDataListElement;
    this._stages = h('input', {
      class: 'jp-tpmlab-input jp-tpmlab-deploy-stages',
      type: 'number',
      min: '1',
      max: '64',
      value: '1',
      title: 'pipeline stages',
      'aria-label': 'pipeline stages'
    }) as HTMLInputElement;
    const deployButton = button(
      'Deploy',
      'Deploy the model as this many pipeline stages',
      () => {
        const name = this._modelName.value.trim();
        const stages = parseInt(this._stages.value, 10) || 1;
        if (name) {
          void this.actions.deploy(name, stages);
        }
      },
      'jp-mod-accept jp-tpmlab-deploy-button'
    );
    const deployForm = h(
      'div',
      { class: 'jp-tpmlab-deploy' },
      this._modelName,
      this._available,
      h('label', { class: 'jp-tpmlab-stages-label' }, '×', this._stages),
      deployButton
    );

    this._cluster = h('div', { class: 'jp-tpmlab-cluster' });
    this._models = h('div', { class: 'jp-tpmlab-models' });
    this._requests = h('div', { class: 'jp-tpmlab-requests' });
    this._usage = h('div', { class: 'jp-tpmlab-usage' });
    this._message = h('div', { class: 'jp-tpmlab-message' });

    this.node.append(
      header,
      this._message,
      this._cluster,
      h(
        'section',
        { class: 'jp-tpmlab-section' },
        h(
          'header',
          { class: 'jp-tpmlab-section-header' },
          'Models',
          h('span', { class: 'jp-tpmlab-section-tools' }, 'lens ', this._lens)
        ),
        this._models,
        deployForm
      ),
      this._requests,
      this._usage
    );
    this._cluster.append(h('div', { class: 'jp-tpmlab-empty' }, 'Loading…'));
  }

  /** Offer these lenses in the lens menu (GET /tpmlab/api/lenses), keeping the choice. */
  setLenses(lenses: ILensJSON[]): void {
    const { choices, selected } = lensMenu(lenses, this._lens.value || null);
    this._lens.replaceChildren(
      ...choices.map(c => h('option', { value: c.value, title: c.title }, c.label))
    );
    this._lens.value = selected ?? '';
  }

  setAvailable(names: string[]): void {
    this._available.replaceChildren(...names.map(n => h('option', { value: n })));
  }

  /** A transient note under the header (errors of actions, backoff state). */
  setMessage(text: string | null, tone: Tone = 'error'): void {
    this._message.replaceChildren(
      ...(text ? [h('div', { class: `jp-tpmlab-note jp-tpmlab-tone-${tone}` }, text)] : [])
    );
  }

  render(vm: IViewModel): void {
    this._dashboardUrl = vm.dashboardUrl;
    this._dashboardButton.disabled = !vm.dashboardUrl;
    this._dashboardButton.title = vm.dashboardUrl
      ? `Open the Dask dashboard (${vm.dashboardUrl})`
      : 'This cluster serves no dashboard';

    const workers = vm.workers.length
      ? table(
          ['worker', 'memory', ...(vm.showGpu ? ['GPU memory'] : []), 'stages'],
          vm.workers.map(w => [
            h('span', { title: w.address, class: 'jp-tpmlab-mono' }, w.name),
            h('div', { class: 'jp-tpmlab-memory' }, w.memory, meter(w.memoryFraction)),
            ...(vm.showGpu ? [w.gpu] : []),
            w.stages.length
              ? h('span', {}, w.stages.map(s => h('span', { class: 'jp-tpmlab-chip' }, s)))
              : h('span', { class: 'jp-tpmlab-dim' }, 'idle')
          ]),
          'jp-tpmlab-workers'
        )
      : h('div', { class: 'jp-tpmlab-empty' }, vm.connected ? 'No workers.' : '');
    this._cluster.replaceChildren(
      section(
        'Cluster',
        h(
          'div',
          { class: 'jp-tpmlab-kv' },
          badge(vm.connected ? 'connected' : 'offline', vm.tone),
          h('span', { class: 'jp-tpmlab-title2' }, vm.title),
          h('span', { class: 'jp-tpmlab-mono jp-tpmlab-address', title: vm.address }, vm.address)
        ),
        vm.errors.map(e => h('div', { class: 'jp-tpmlab-note jp-tpmlab-tone-error' }, e)),
        workers
      )
    );

    this._models.replaceChildren(
      ...(vm.models.length
        ? vm.models.map(m =>
            h(
              'div',
              { class: 'jp-tpmlab-model', 'data-model': m.name },
              h(
                'div',
                { class: 'jp-tpmlab-model-header' },
                h('span', { class: 'jp-tpmlab-model-name' }, m.name),
                m.version
                  ? h('code', { class: 'jp-tpmlab-digest', title: m.versionFull }, m.version)
                  : null,
                badge(m.health, m.tone)
              ),
              h('div', { class: 'jp-tpmlab-dim jp-tpmlab-model-detail' }, m.detail),
              m.error ? h('div', { class: 'jp-tpmlab-note jp-tpmlab-tone-error' }, m.error) : null,
              m.stages.length
                ? table(
                    ['#', 'layers', 'worker', ...(m.showDevice ? ['device'] : []), 'size', 'req', ''],
                    m.stages.map(s => [
                      s.label,
                      s.layers,
                      h('span', { class: 'jp-tpmlab-mono', title: `device ${s.device}` }, s.worker),
                      ...(m.showDevice ? [s.device] : []),
                      s.size,
                      h('span', { title: 'requests in flight on this stage' }, s.requests),
                      h('span', {
                        class: `jp-tpmlab-dot jp-tpmlab-tone-${s.tone}`,
                        title: s.health
                      })
                    ]),
                    'jp-tpmlab-stages'
                  )
                : null,
              h(
                'div',
                { class: 'jp-tpmlab-model-actions' },
                m.deployed
                  ? button(
                      'Insert lens',
                      'Insert a cell opening the lens dashboard into the active notebook',
                      () => void this.actions.openLens(m.name, this._lens.value, false),
                      'jp-tpmlab-lens-cell'
                    )
                  : null,
                m.deployed
                  ? button(
                      'Lens notebook',
                      'Create a notebook that opens the lens dashboard',
                      () => void this.actions.openLens(m.name, this._lens.value, true),
                      'jp-tpmlab-lens-notebook'
                    )
                  : null,
                // a gateway's model belongs to the gateway: nothing to undeploy from here
                m.gateway
                  ? null
                  : button(
                      m.deployed ? 'Undeploy' : 'Dismiss',
                      m.deployed ? 'Remove this model from the cluster' : 'Forget this deploy',
                      () => void this.actions.undeploy(m.name),
                      'jp-mod-warn jp-tpmlab-undeploy'
                    )
              )
            )
          )
        : [h('div', { class: 'jp-tpmlab-empty' }, 'No model deployed.')])
    );

    this._requests.replaceChildren(
      section(
        'Requests',
        h(
          'dl',
          { class: 'jp-tpmlab-dl' },
          h('dt', {}, 'running'),
          h(
            'dd',
            {},
            vm.running.length
              ? vm.running.map(r => h('span', { class: 'jp-tpmlab-chip' }, `${r.model}: ${r.count}`))
              : '0'
          ),
          h('dt', {}, 'queued'),
          h(
            'dd',
            { title: vm.queued === '–' ? 'queues are kept by a gateway; none is in use' : '' },
            vm.queued
          )
        )
      )
    );

    this._usage.replaceChildren(
      ...(vm.usage
        ? [section('Usage', h('div', { class: 'jp-tpmlab-kv' }, vm.usage.text), meter(vm.usage.fraction))]
        : [])
    );
  }

  private _dashboardUrl: string | null = null;
  private readonly _dashboardButton: HTMLButtonElement;
  private readonly _lens: HTMLSelectElement;
  private readonly _modelName: HTMLInputElement;
  private readonly _available: HTMLDataListElement;
  private readonly _stages: HTMLInputElement;
  private readonly _cluster: HTMLElement;
  private readonly _models: HTMLElement;
  private readonly _requests: HTMLElement;
  private readonly _usage: HTMLElement;
  private readonly _message: HTMLElement;
}
