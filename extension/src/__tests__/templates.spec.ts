import { lensCell } from '../templates';

describe('lensCell', () => {
  it('opens a lens dashboard on the default engine', () => {
    expect(lensCell('smollm2-135m')).toBe(
      [
        'import tpmlab',
        'from tpmlab.widgets import dashboard',
        '',
        'lab = tpmlab.connect()',
        'model = lab.model("smollm2-135m")',
        'dashboard(model, "logit")'
      ].join('\n')
    );
  });
  it('connects to the sidebar\'s scheduler and quotes names safely', () => {
    const code = lensCell('my "model"', 'attention', 'tcp://10.0.0.5:8786');
    expect(code).toContain('lab = tpmlab.connect("tcp://10.0.0.5:8786")');
    expect(code).toContain('model = lab.model("my \\"model\\"")');
    expect(code).toContain('dashboard(model, "attention")');
  });
  it('does not pass in-process scheduler addresses to a kernel', () => {
    expect(lensCell('m', 'logit', 'inproc://10.0.0.5/1/1')).toContain('tpmlab.connect()');
  });
});
