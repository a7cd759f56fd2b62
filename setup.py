"Package set-up, read from settings.ini (nbdev 2 layout). Written by hand: the nbdev template's setup.py needs pkg_resources."
from configparser import ConfigParser
from pathlib import Path
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read(Path(__file__).parent/'settings.ini', encoding='utf-8')
c = cfg['DEFAULT']

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
lic = licenses[c['license']]
requirements = c.get('requirements', '').split()
dev_requirements = c.get('dev_requirements', '').split()
console_scripts = c.get('console_scripts', '').split()
readme = Path(__file__).parent/'README.md'

setuptools.setup(
    name=c['lib_name'],
    version=c['version'],
    description=c['description'],
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else '',
    long_description_content_type='text/markdown',
    license=lic[0],
    classifiers=['Development Status :: ' + statuses[int(c['status'])],
                 'Intended Audience :: ' + c['audience'].title(),
                 'License :: ' + lic[1],
                 'Natural Language :: ' + c['language'].title(),
                 'Programming Language :: Python :: 3'],
    url=c['git_url'],
    author=c['author'], author_email=c['author_email'],
    packages=setuptools.find_packages(include=[c['lib_name'], c['lib_name'] + '.*']),
    include_package_data=True,
    package_data={c['lib_name']: ['data/*.txt', 'csrc/*.cc']},   # the C++ kernels' sources (lesson 3a) ship with the package
    install_requires=requirements,
    extras_require={'dev': dev_requirements},
    python_requires='>=' + c['min_python'],
    entry_points={'console_scripts': console_scripts,
                  'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
    zip_safe=False,
)
