/**
 * The JSON of GET /tpmlab/api/status (docs/rest-api.md) and the view model the sidebar
 * renders from it. Pure logic: tested without JupyterLab.
 */

export interface IGpuJSON {
  name: string | null;
  memory_used: number | null;
  memory_total: number | null;
  utilization: number | null;
}

export interface IWorkerJSON {
  address: string;
  name: string;
  host: string | null;
  nthreads: number | null;
  memory: number | null;
  memory_limit: number | null;
  cpu: number | null;
  resources: Record<string, number>;
  gpu: IGpuJSON | null;
  status: string | null;
}

export interface IStageJSON {
  index: number;
  worker: string;
  device: string | null;
  layers: [number | null, number | null];
  bytes: number | null;
  health: 'ok' | 'lost' | 'unresponsive';
  requests: number | null;
  rss: number | null;
  gpu_allocated: number | null;
  /** The stage worker's peak resident bytes since the stage was loaded. */
  peak_rss?: number | null;
  /** Its peak GPU memory (PyTorch's allocator) since the stage was loaded. */
  gpu_peak?: number | null;
}

export interface IModelJSON {
  name: string;
  version: string | null;
  family: string | null;
  dtype: string | null;
  n_layers: number | null;
  stages: IStageJSON[];
  health: 'ok' | 'degraded' | 'lost' | 'deploying' | 'failed';
  state: 'deployed' | 'deploying' | 'failed';
  error: string | null;
  requested_stages?: number;
  /** The gateway that serves this model (its stages are not visible from here). */
  gateway?: string | null;
}

export interface IUsageJSON {
  used?: number;
  quota?: number;
  unit?: string;
  queued?: number;
  error?: string;
}

export interface IStatusJSON {
  time: number;
  cluster: {
    connected: boolean;
    address: string | null;
    embedded: boolean;
    workers: IWorkerJSON[];
    dashboard: { url: string; direct: string } | null;
  } | null;
  models: IModelJSON[];
  requests: {
    running: { model: string; running: number; per_stage: (number | null)[] }[];
    queued: number | null;
  } | null;
  usage: IUsageJSON | null;
  errors: string[];
}

export type Tone = 'ok' | 'warn' | 'error' | 'busy' | 'idle';

export interface IWorkerRow {
  name: string;
  address: string;
  memory: string;
  /** Used / limit in [0, 1], or null when the limit is unknown. */
  memoryFraction: number | null;
  gpu: string;
  /** "model[stage]" for every stage this worker holds. */
  stages: string[];
}

export interface IStageRow {
  label: string;
  layers: string;
  worker: string;
  device: string;
  size: string;
  requests: string;
  health: string;
  tone: Tone;
}

export interface IModelView {
  name: string;
  /** Whether any stage sits on a device other than the CPU (else no device column). */
  showDevice: boolean;
  version: string;
  versionFull: string;
  detail: string;
  health: string;
  tone: Tone;
  deployed: boolean;
  /** The gateway serving the model: it cannot be undeployed from here. */
  gateway: string | null;
  error: string | null;
  stages: IStageRow[];
}

export interface IViewModel {
  connected: boolean;
  /** Whether any worker reports a GPU (else the GPU column is left out). */
  showGpu: boolean;
  title: string;
  address: string;
  tone: Tone;
  dashboardUrl: string | null;
  workers: IWorkerRow[];
  models: IModelView[];
  running: { model: string; count: number }[];
  queued: string;
  usage: { text: string; fraction: number | null } | null;
  errors: string[];
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** Bytes as a short human string: 1536 -> "1.5 KiB". */
/** A stage's weights, and the peak memory its device held since it loaded them. */
export function stageSize(s: IStageJSON): string {
  const onGpu = !!s.device && s.device !== 'cpu';
  const peak = onGpu ? s.gpu_peak : s.peak_rss;
  return peak ? `${formatBytes(s.bytes)} (peak ${formatBytes(peak)})` : formatBytes(s.bytes);
}

export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) {
    return '–';
  }
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

/** The worker's short name: "tcp://127.0.0.1:40123" -> "127.0.0.1:40123". */
export function shortAddress(address: string): string {
  return address.replace(/^[a-z]+:\/\//, '');
}

export function layerRange(layers: [number | null, number | null]): string {
  const [first, last] = layers;
  if (first === null || last === null) {
    return '–';
  }
  return first === last ? `${first}` : `${first}–${last}`;
}

export function healthTone(health: string): Tone {
  switch (health) {
    case 'ok':
      return 'ok';
    case 'deploying':
      return 'busy';
    case 'degraded':
    case 'unresponsive':
      return 'warn';
    default:
      return 'error';
  }
}

function gpuText(gpu: IGpuJSON | null): string {
  if (!gpu) {
    return '–';
  }
  if (gpu.memory_used !== null && gpu.memory_total) {
    return `${formatBytes(gpu.memory_used)} / ${formatBytes(gpu.memory_total)}`;
  }
  return gpu.name ?? 'GPU';
}

export function toViewModel(status: IStatusJSON): IViewModel {
  const cluster = status.cluster;
  const connected = !!cluster?.connected;
  const workerNames = new Map<string, string>();
  for (const w of cluster?.workers ?? []) {
    workerNames.set(w.address, w.name && w.name !== w.address ? w.name : shortAddress(w.address));
  }
  const stagesOn = new Map<string, string[]>();
  for (const m of status.models) {
    for (const s of m.stages) {
      const list = stagesOn.get(s.worker) ?? [];
      list.push(`${m.name}[${s.index}]`);
      stagesOn.set(s.worker, list);
    }
  }
  const workers: IWorkerRow[] = (cluster?.workers ?? []).map(w => ({
    name: workerNames.get(w.address) ?? w.address,
    address: w.address,
    memory:
      w.memory_limit ? `${formatBytes(w.memory)} / ${formatBytes(w.memory_limit)}` : formatBytes(w.memory),
    memoryFraction:
      w.memory !== null && w.memory_limit ? Math.min(1, w.memory / w.memory_limit) : null,
    gpu: gpuText(w.gpu),
    stages: stagesOn.get(w.address) ?? []
  }));
  const models: IModelView[] = status.models.map(m => {
    const deployed = m.state === 'deployed';
    const gateway = m.gateway ?? null;
    const detail = deployed
      ? [
          m.family,
          m.dtype,
          m.n_layers !== null ? `${m.n_layers} layers` : null,
          gateway
            ? `served by ${shortAddress(gateway)}`
            : `${m.stages.length} stage${m.stages.length === 1 ? '' : 's'}`
        ]
          .filter(Boolean)
          .join(' · ')
      : m.state === 'deploying'
        ? `deploying as ${m.requested_stages ?? '?'} stage(s)…`
        : 'deploy failed';
    return {
      name: m.name,
      showDevice: m.stages.some(s => !!s.device && s.device !== 'cpu'),
      version: m.version ? m.version.slice(0, 12) : '',
      versionFull: m.version ?? '',
      detail,
      health: m.health,
      tone: healthTone(m.health),
      deployed,
      gateway,
      error: m.error,
      stages: m.stages.map(s => ({
        label: `${s.index}`,
        layers: layerRange(s.layers),
        worker: workerNames.get(s.worker) ?? shortAddress(s.worker),
        device: s.device ?? '–',
        size: stageSize(s),
        requests: s.requests === null ? '–' : `${s.requests}`,
        health: s.health,
        tone: healthTone(s.health)
      }))
    };
  });
  let usage: IViewModel['usage'] = null;
  if (status.usage) {
    const u = status.usage;
    if (u.error) {
      usage = { text: `usage unavailable: ${u.error}`, fraction: null };
    } else {
      const unit = u.unit ? ` ${u.unit}` : '';
      const text =
        u.quota !== undefined ? `${u.used ?? 0} / ${u.quota}${unit}` : `${u.used ?? 0}${unit}`;
      usage = {
        text,
        fraction: u.quota ? Math.min(1, (u.used ?? 0) / u.quota) : null
      };
    }
  }
  const queued =
    status.requests?.queued ?? status.usage?.queued ?? null;
  const errors = status.errors ?? [];
  return {
    connected,
    showGpu: workers.some(w => w.gpu !== '–'),
    title: connected
      ? cluster?.embedded
        ? 'Embedded cluster'
        : 'Dask cluster'
      : 'No cluster',
    address: connected
      ? cluster?.address ?? ''
      : cluster?.embedded
        ? 'started by the first deploy (tpmlab.connect())'
        : `not reachable: ${cluster?.address ?? ''}`,
    tone: errors.length ? 'error' : connected ? 'ok' : 'idle',
    dashboardUrl: cluster?.dashboard?.url ?? null,
    workers,
    models,
    running: (status.requests?.running ?? []).map(r => ({ model: r.model, count: r.running })),
    queued: queued === null ? '–' : `${queued}`,
    usage,
    errors
  };
}
