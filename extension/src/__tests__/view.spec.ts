import { formatBytes, healthTone, IStatusJSON, layerRange, stageSize, toViewModel } from '../view';

const STATUS: IStatusJSON = {
  time: 0,
  cluster: {
    connected: true,
    address: 'tcp://127.0.0.1:8786',
    embedded: false,
    dashboard: { url: '/user/ana/proxy/8787/status', direct: 'http://127.0.0.1:8787/status' },
    workers: [
      {
        address: 'tcp://127.0.0.1:4001',
        name: '0',
        host: '127.0.0.1',
        nthreads: 1,
        memory: 512 * 2 ** 20,
        memory_limit: 2 * 2 ** 30,
        cpu: 3,
        resources: {},
        gpu: null,
        status: 'running'
      },
      {
        address: 'tcp://127.0.0.1:4002',
        name: 'tcp://127.0.0.1:4002',
        host: '127.0.0.1',
        nthreads: 1,
        memory: 3 * 2 ** 30,
        memory_limit: 4 * 2 ** 30,
        cpu: 3,
        resources: { GPU: 1 },
        gpu: { name: 'H100', memory_used: 10 * 2 ** 30, memory_total: 80 * 2 ** 30, utilization: 5 },
        status: 'running'
      }
    ]
  },
  models: [
    {
      name: 'smollm2-135m',
      version: 'abcdef0123456789abcdef',
      family: 'llama',
      dtype: 'float32',
      n_layers: 30,
      health: 'degraded',
      state: 'deployed',
      error: null,
      stages: [
        {
          index: 0, worker: 'tcp://127.0.0.1:4001', device: 'cpu', layers: [0, 14],
          bytes: 270 * 2 ** 20, health: 'ok', requests: 0, rss: null, gpu_allocated: null
        },
        {
          index: 1, worker: 'tcp://127.0.0.1:4002', device: 'cuda:0', layers: [15, 29],
          bytes: 270 * 2 ** 20, health: 'unresponsive', requests: null, rss: null, gpu_allocated: null
        }
      ]
    },
    {
      name: 'tiny-llama', version: null, family: null, dtype: null, n_layers: null, stages: [],
      health: 'deploying', state: 'deploying', error: null, requested_stages: 2
    }
  ],
  requests: { running: [{ model: 'smollm2-135m', running: 1, per_stage: [1, null] }], queued: null },
  usage: null,
  errors: []
};

describe('formatting', () => {
  it('formats bytes with binary units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(270 * 2 ** 20)).toBe('270 MiB');
    expect(formatBytes(null)).toBe('–');
  });
  it("shows a stage's peak next to its weights: the GPU's on a GPU, else the worker's", () => {
    const stage = {
      index: 0, worker: 'w', device: 'cuda:0', layers: [0, 1] as [number, number], bytes: 2 ** 30,
      health: 'ok' as const, requests: 0, rss: 2 ** 31, gpu_allocated: 2 ** 30,
      peak_rss: 3 * 2 ** 30, gpu_peak: 1.5 * 2 ** 30
    };
    expect(stageSize(stage)).toBe('1.0 GiB (peak 1.5 GiB)');
    expect(stageSize({ ...stage, device: 'cpu' })).toBe('1.0 GiB (peak 3.0 GiB)');
    expect(stageSize({ ...stage, gpu_peak: undefined })).toBe('1.0 GiB');
  });
  it('formats layer ranges', () => {
    expect(layerRange([0, 14])).toBe('0–14');
    expect(layerRange([3, 3])).toBe('3');
    expect(layerRange([null, null])).toBe('–');
  });
  it('maps health to tones', () => {
    expect(['ok', 'deploying', 'degraded', 'unresponsive', 'lost', 'failed'].map(healthTone)).toEqual([
      'ok', 'busy', 'warn', 'warn', 'error', 'error'
    ]);
  });
});

describe('toViewModel', () => {
  const vm = toViewModel(STATUS);

  it('describes the cluster and its dashboard link', () => {
    expect(vm.connected).toBe(true);
    expect(vm.title).toBe('Dask cluster');
    expect(vm.address).toBe('tcp://127.0.0.1:8786');
    expect(vm.dashboardUrl).toBe('/user/ana/proxy/8787/status');
    expect(vm.tone).toBe('ok');
  });

  it('lists workers with memory, GPU memory and the stages they hold', () => {
    expect(vm.workers.map(w => w.name)).toEqual(['0', '127.0.0.1:4002']);
    expect(vm.workers[0].memory).toBe('512 MiB / 2.0 GiB');
    expect(vm.workers[0].memoryFraction).toBeCloseTo(0.25);
    expect(vm.workers[0].gpu).toBe('–');
    expect(vm.workers[1].gpu).toBe('10.0 GiB / 80.0 GiB');
    expect(vm.workers[0].stages).toEqual(['smollm2-135m[0]']);
    expect(vm.showGpu).toBe(true);
    expect(vm.models[0].showDevice).toBe(true);
    expect(vm.workers[1].stages).toEqual(['smollm2-135m[1]']);
  });

  it('shows each model with its digest, stages, layers and health', () => {
    const [m, pending] = vm.models;
    expect(m.version).toBe('abcdef012345');
    expect(m.versionFull).toBe('abcdef0123456789abcdef');
    expect(m.detail).toBe('llama · float32 · 30 layers · 2 stages');
    expect(m.tone).toBe('warn');
    expect(m.stages.map(s => [s.label, s.layers, s.worker, s.requests, s.tone])).toEqual([
      ['0', '0–14', '0', '0', 'ok'],
      ['1', '15–29', '127.0.0.1:4002', '–', 'warn']
    ]);
    expect(pending.deployed).toBe(false);
    expect(pending.detail).toBe('deploying as 2 stage(s)…');
    expect(pending.tone).toBe('busy');
  });

  it("shows a gateway's model as served by it, not as a model of no stages", () => {
    const served = {
      name: 'smollm2-135m', version: 'abc', family: 'llama', dtype: 'bfloat16', n_layers: null,
      stages: [], health: 'ok' as const, state: 'deployed' as const, error: null,
      gateway: 'https://hub.example.org/services/tpmlab'
    };
    const [m] = toViewModel({ ...STATUS, models: [served] }).models;
    expect(m.detail).toBe('llama · bfloat16 · served by hub.example.org/services/tpmlab');
    expect(m.gateway).toBe('https://hub.example.org/services/tpmlab');
    expect(vm.models[0].gateway).toBeNull();
  });

  it('reports running requests and says queues need a gateway', () => {
    expect(vm.running).toEqual([{ model: 'smollm2-135m', count: 1 }]);
    expect(vm.queued).toBe('–');
    expect(vm.usage).toBeNull();
  });

  it('shows usage and quota when a gateway reports them', () => {
    const v = toViewModel({ ...STATUS, usage: { used: 30, quota: 120, unit: 'SU', queued: 2 } });
    expect(v.usage).toEqual({ text: '30 / 120 SU', fraction: 0.25 });
    expect(v.queued).toBe('2');
  });

  it('handles a server with no cluster yet', () => {
    const v = toViewModel({
      ...STATUS,
      cluster: { connected: false, address: null, embedded: true, workers: [], dashboard: null },
      models: [],
      requests: null
    });
    expect(v.connected).toBe(false);
    expect(v.title).toBe('No cluster');
    expect(v.address).toMatch(/first deploy/);
    expect(v.dashboardUrl).toBeNull();
    expect(v.workers).toEqual([]);
    expect(v.tone).toBe('idle');
    expect(v.showGpu).toBe(false);
  });

  it('turns server errors into an error tone', () => {
    const v = toViewModel({ ...STATUS, errors: ['cannot reach the scheduler'] });
    expect(v.tone).toBe('error');
    expect(v.errors).toEqual(['cannot reach the scheduler']);
  });
});
